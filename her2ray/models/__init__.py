"""Slide-level MIL models (KAT, gated ABMIL) behind one factory, so trainers and scorers never branch.

Both models share the forward signature ``(features, anchor_dist, tile_mask, kernel_mask,
return_attention=False)``; ``build_model`` is the only place that maps a name to a class.
"""

from __future__ import annotations

from typing import Any

MODEL_NAMES: tuple[str, ...] = ("kat", "abmil")


def build_model(name: str, patch_dim: int, num_classes: int, **hparams: Any):
    """A fresh ``torch.nn.Module`` for ``name`` in {"kat", "abmil"}.

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
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
