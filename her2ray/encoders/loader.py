"""``load_encoder``: one entry point that builds any open_clip image tower and loads its weights.

Names:
* ``"plip"``: PLIP = OpenAI CLIP ViT-B/32 with **QuickGELU** (open_clip ``ViT-B-32-quickgelu``), 512-d.
  ``weights`` = ``"vinid/plip"`` (hub, transformers format, converted on load), a local folder in
  transformers or open_clip format, or a single state-dict file.
* ``"open_clip:<ARCH>"``: any open_clip architecture; ``weights`` may also be one of open_clip's pretrained
  tags for ARCH (e.g. ``"openai"``, ``"laion2b_s34b_b79k"``).
* ``"open_clip"``: the architecture is read from the weights folder's ``open_clip_config.json``.

``weights=None`` (or ``"random"``) gives the architecture with seeded random weights. The identity then says
so (``random_weights=True``, ``source="random-init"``, ``weights_sha256`` of the random tensors), so a feature
store made that way can never be mistaken for real PLIP features.

Why the image tower is built without the text tower: it is all tiles need, and it builds 5x faster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import torch

from ..errors import ConfigError
from . import convert, weights as wts
from .tile_encoder import TileEncoder

log = logging.getLogger(__name__)

PLIP_ARCH = "ViT-B-32-quickgelu"
PLIP_HUB_ID = "vinid/plip"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM = "random"


def _parse_name(name: str) -> tuple[str, str | None]:
    """-> (identity name, open_clip architecture or None when the weights folder defines it)."""
    if name == "plip":
        return "plip", PLIP_ARCH
    if name == "open_clip":
        return "open_clip", None
    if name.startswith("open_clip:") and len(name) > len("open_clip:"):
        arch = name.split(":", 1)[1]
        if _arch_config(arch) is None:
            raise ConfigError(f"encoder {name!r}: open_clip has no architecture {arch!r}")
        return name, arch
    raise ConfigError(f"unknown encoder {name!r}: use 'plip', 'open_clip:<architecture>' "
                      "(e.g. open_clip:ViT-B-16) or 'open_clip' with an open_clip weights folder")


def _arch_config(arch: str) -> dict[str, Any] | None:
    import open_clip

    return open_clip.get_model_config(arch)


def _vision_key(model_cfg: dict[str, Any]) -> tuple:
    """What determines the image tower's math: projection dim, activation, normalised vision config."""
    from open_clip.model import CLIPVisionCfg

    vc = model_cfg.get("vision_cfg") or {}
    try:
        vcfg = dataclasses.asdict(CLIPVisionCfg(**vc))
    except TypeError as exc:
        raise ConfigError(f"invalid open_clip vision_cfg {vc}: {exc}") from None
    return (int(model_cfg.get("embed_dim", 0)), bool(model_cfg.get("quick_gelu", False)),
            json.dumps(vcfg, sort_keys=True, default=str))


def _architecture_name(model_cfg: dict[str, Any], preferred: str | None) -> str:
    """A known open_clip name whose image tower equals ``model_cfg``'s, else ``custom-<hash>``."""
    import open_clip

    key = _vision_key(model_cfg)
    # Several open_clip configs share an image tower (e.g. roberta-ViT-B-32); prefer the plain CLIP names.
    ranked = sorted(open_clip.list_models(), key=lambda n: (not n.startswith(("ViT-", "RN")), len(n), n))
    candidates = ([preferred] if preferred else []) + [PLIP_ARCH] + ranked
    for name in candidates:
        cfg = _arch_config(name)
        if cfg is not None and "vision_cfg" in cfg:
            try:
                if _vision_key(cfg) == key:
                    return name
            except ConfigError:
                continue
    return "custom-" + hashlib.sha256(repr(key).encode()).hexdigest()[:12]


def _build_visual(model_cfg: dict[str, Any], seed: int) -> torch.nn.Module:
    """The image tower alone, initialised under a fixed seed (so random-init is reproducible)."""
    from open_clip.model import _build_vision_tower

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_vision_tower(int(model_cfg["embed_dim"]), model_cfg["vision_cfg"],
                                   quick_gelu=bool(model_cfg.get("quick_gelu", False)))


def _image_size(model_cfg: dict[str, Any]) -> int:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"non-square encoder input {size} is not supported")
        size = size[0]
    return int(size)


def _build_loaded(model_cfg: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """The image tower with ``state`` loaded strictly.

    Built on the meta device and filled with ``assign=True`` so that no time goes into a random
    initialisation that is thrown away; falls back to a normal build if anything stays unfilled.
    """
    from open_clip.model import _build_vision_tower

    with torch.device("meta"):
        visual = _build_vision_tower(int(model_cfg["embed_dim"]), model_cfg["vision_cfg"],
                                     quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    try:
        visual.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ConfigError(f"{source}: weights do not fit the architecture: {str(exc)[:600]}") from None
    if any(t.is_meta for t in [*visual.parameters(), *visual.buffers()]):
        visual = _build_visual(model_cfg, seed=0)
        visual.load_state_dict(state, strict=True)
    return visual


def load_encoder(name: str = "plip", weights: str | None = None, device: str | torch.device | None = None,
                 precision: str | None = None, *, seed: int = 0, batch_size: int | None = None) -> TileEncoder:
    """Build the named encoder with its weights; see the module docstring for names and weight sources.

    ``device`` defaults to CUDA when available; ``precision`` to bf16 autocast on GPU, fp32 on CPU
    (also 'fp16', 'bf16-pure', 'fp16-pure'). Raises ConfigError for unusable names or weights.
    """
    ident_name, arch = _parse_name(name)
    mean, std = CLIP_MEAN, CLIP_STD
    weights = None if weights in (None, "", RANDOM) else str(weights)

    if weights is None:
        if arch is None:
            raise ConfigError("encoder 'open_clip' needs --weights (an open_clip folder) to define the model")
        model_cfg = _arch_config(arch)
        visual = _build_visual(model_cfg, seed)
        sha = wts.state_dict_sha256(visual.state_dict())
        source, fmt, random_weights = f"random-init(seed={seed})", "random", True
        log.warning("encoder %s has RANDOM weights (seed %d): features are not biologically meaningful; "
                    "pass --weights (e.g. %s) for real features", ident_name, seed, PLIP_HUB_ID)
    elif arch is not None and not os.path.exists(weights) and weights in _pretrained_tags(arch):
        import open_clip

        model_cfg = _arch_config(arch)
        full = open_clip.create_model(arch, pretrained=weights)
        visual = full.visual
        del full
        pcfg = open_clip.get_pretrained_cfg(arch, weights)
        mean, std = pcfg.get("mean", mean), pcfg.get("std", std)
        sha = wts.state_dict_sha256(visual.state_dict())
        source, fmt, random_weights = f"open_clip-pretrained:{arch}/{weights}", "open_clip-pretrained", False
    else:
        loc = wts.resolve(weights)
        state = wts.load_state_dict(loc.weights_file)
        if loc.fmt == "transformers":
            model_cfg = convert.hf_clip_vision_cfg(loc.config, source=loc.source)
            state = convert.hf_clip_to_open_clip_visual(state)
        elif loc.fmt == "open_clip":
            model_cfg = loc.config.get("model_cfg")
            if not isinstance(model_cfg, dict):
                raise ConfigError(f"{loc.source}: {wts.OPEN_CLIP_CONFIG} has no 'model_cfg' mapping")
            pre = loc.config.get("preprocess_cfg") or {}
            mean, std = tuple(pre.get("mean", mean)), tuple(pre.get("std", std))
            state = convert.open_clip_visual_state(state)
        else:  # a bare state-dict file: the name must say which architecture it is
            if arch is None:
                raise ConfigError(f"{weights}: a single weights file needs an architecture: use "
                                  "--encoder plip or open_clip:<architecture>")
            model_cfg = _arch_config(arch)
            state = (convert.hf_clip_to_open_clip_visual(state) if convert.is_hf_clip_state_dict(state)
                     else convert.open_clip_visual_state(state))
        if arch is not None and _vision_key(model_cfg) != _vision_key(_arch_config(arch)):
            found = _architecture_name(model_cfg, None)
            raise ConfigError(f"{loc.source}: weights are a {found} image tower, not {arch} as encoder "
                              f"{ident_name!r} requires (check QuickGELU vs GELU and sizes)")
        visual = _build_loaded(model_cfg, {k: v.float() for k, v in state.items()}, loc.source)
        sha = wts.file_sha256(loc.weights_file)
        source, fmt, random_weights = loc.source, loc.fmt, False

    size = _image_size(model_cfg)
    identity = {
        "name": ident_name,
        "architecture": arch or _architecture_name(model_cfg, None),
        "weights_sha256": sha,
        "dim": int(model_cfg["embed_dim"]),
        "source": source,
        "weights_format": fmt,
        "random_weights": random_weights,
        "preprocess": {"resize": "bicubic-antialias", "size": size,
                       "mean": [float(m) for m in mean], "std": [float(s) for s in std]},
    }
    return TileEncoder(visual, identity, mean=mean, std=std, input_size=size, device=device,
                       precision=precision, batch_size=batch_size)


def _pretrained_tags(arch: str) -> list[str]:
    import open_clip

    try:
        return list(open_clip.list_pretrained_tags_by_model(arch))
    except Exception:  # noqa: BLE001
        return []


def write_open_clip_dir(encoder_or_state: TileEncoder | dict[str, torch.Tensor], model_cfg: dict[str, Any],
                        out_dir: str, mean=CLIP_MEAN, std=CLIP_STD) -> str:
    """Save an image tower as an open_clip-format folder (``visual.*`` keys only) that ``load_encoder``
    reads back; e.g. a one-time offline conversion of PLIP, or a tiny encoder for tests."""
    from safetensors.torch import save_file

    state = (encoder_or_state.visual.state_dict() if isinstance(encoder_or_state, TileEncoder)
             else encoder_or_state)
    os.makedirs(out_dir, exist_ok=True)
    save_file({f"visual.{k}": v.detach().cpu().float().contiguous() for k, v in state.items()},
              os.path.join(out_dir, wts.OPEN_CLIP_WEIGHTS[0]))
    cfg = {"model_cfg": model_cfg,
           "preprocess_cfg": {"mean": list(mean), "std": list(std), "interpolation": "bicubic",
                              "resize_mode": "shortest"}}
    with open(os.path.join(out_dir, wts.OPEN_CLIP_CONFIG), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
    return out_dir
