"""Slide-level models (KAT, gated ABMIL, SlideGraph+) behind one registry, so trainers and scorers never branch.

KAT and ABMIL share the bag forward signature ``(features, anchor_dist, tile_mask, kernel_mask,
return_attention=False)`` and the bag data (``models.bags``); SlideGraph+ takes packed slide graphs
(``models.slidegraph_data``). ``build_model``, ``make_dataset``, ``collate_for`` and ``forward_batch`` are the
only places that map a model name to its class, data and call.
"""

from __future__ import annotations

from typing import Any

MODEL_NAMES: tuple[str, ...] = ("kat", "abmil", "slidegraph")
GRAPH_MODELS: frozenset[str] = frozenset({"slidegraph"})


def build_model(name: str, patch_dim: int, num_classes: int, **hparams: Any):
    """A fresh ``torch.nn.Module`` for ``name`` in ``MODEL_NAMES``.

    ``hparams`` go to the constructor; keys a model does not take raise ``TypeError`` (no silent drops),
    except ``npk`` / ``max_nodes`` which are data-side KAT settings and are ignored by ABMIL.
    """
    key = str(name).lower()
    if key == "kat":
        from .kat import KernelAttentionTransformer

        hp = {k: v for k, v in hparams.items() if k != "max_nodes"}
        return KernelAttentionTransformer(patch_dim=patch_dim, num_classes=num_classes, **hp)
    if key == "abmil":
        from .abmil import GatedABMIL

        hp = {k: v for k, v in hparams.items() if k not in ("npk", "max_nodes")}
        return GatedABMIL(patch_dim=patch_dim, num_classes=num_classes, **hp)
    if key == "slidegraph":
        from .slidegraph import SlideGraphPlus

        return SlideGraphPlus(patch_dim=patch_dim, num_classes=num_classes, **hparams)
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")


def make_dataset(name: str, feature_urls, labels, *, aug_rate: float, seed: int, **settings: Any):
    """The training/eval dataset of model ``name``: ``BagDataset`` (KAT, ABMIL) or ``GraphDataset``.

    ``settings``: bag keys (``npk``, ``max_nodes``, ``cache_features``) and/or ``graph`` (GraphParams
    fields); each dataset takes the keys it uses.
    """
    if str(name).lower() in GRAPH_MODELS:
        from .slidegraph_data import GraphDataset

        return GraphDataset(feature_urls, labels, aug_rate=aug_rate, seed=seed, graph=settings.get("graph"))
    from .bags import BagDataset

    bag = {k: settings[k] for k in ("npk", "max_nodes", "cache_features") if k in settings}
    return BagDataset(feature_urls, labels, aug_rate=aug_rate, seed=seed, **bag)


def collate_for(name: str):
    """The DataLoader ``collate_fn`` that goes with :func:`make_dataset` for model ``name``."""
    if str(name).lower() in GRAPH_MODELS:
        from .slidegraph_data import collate_graphs

        return collate_graphs
    from .bags import collate_bags

    return collate_bags


def forward_batch(model, batch: dict[str, Any], return_attention: bool = False):
    """Run ``model`` on a collated batch of its own data kind (graph models define ``forward_batch``)."""
    if hasattr(model, "forward_batch"):
        return model.forward_batch(batch, return_attention=return_attention)
    return model(batch["features"], batch["anchor_dist"], batch["tile_mask"], batch["kernel_mask"],
                 return_attention=return_attention)
