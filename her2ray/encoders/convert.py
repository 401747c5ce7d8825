"""Convert a transformers ``CLIPModel`` checkpoint (PLIP's only published format) to open_clip's layout.

Why: ``vinid/plip`` ships only ``config.json`` + ``pytorch_model.bin`` in transformers format, so open_clip's
``hf-hub:`` route cannot load it. The mapping is the one verified in design/encoders.md §2.2: renames,
q/k/v concatenated (in that order) into ``in_proj_*``, and the projection matrix transposed. The activation
has no parameters, so it must come from the config (``quick_gelu``): loading PLIP weights into plain
``ViT-B-32`` (exact GELU) succeeds strictly but is silently wrong. Only the image tower is converted; the
text tower is never used for tile embeddings.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from ..errors import ConfigError

_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_PER_LAYER = {
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_TOP = {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",   # sic: transformers' spelling
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
_ACTS = {"quick_gelu": True, "gelu": False}


def hf_clip_vision_cfg(config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """open_clip ``model_cfg`` (image tower only) equivalent to a transformers CLIP ``config.json``.

    Raises ConfigError for anything open_clip's ``VisionTransformer`` cannot express exactly
    (other activations, LayerNorm eps, head width that is not an integer).
    """
    if config.get("model_type") not in (None, "clip"):
        raise ConfigError(f"{source}: model_type {config.get('model_type')!r} is not a transformers CLIP model")
    vc = dict(config.get("vision_config") or {})
    width = int(vc.get("hidden_size", 768))
    heads = int(vc.get("num_attention_heads", 12))
    layers = int(vc.get("num_hidden_layers", 12))
    mlp = int(vc.get("intermediate_size", 3072))
    act = vc.get("hidden_act", "quick_gelu")
    eps = float(vc.get("layer_norm_eps", 1e-5))
    if act not in _ACTS:
        raise ConfigError(f"{source}: vision hidden_act {act!r} has no open_clip equivalent "
                          f"(supported: {sorted(_ACTS)})")
    if not math.isclose(eps, 1e-5, rel_tol=1e-6):
        raise ConfigError(f"{source}: vision layer_norm_eps {eps} differs from open_clip's 1e-5")
    if width % heads:
        raise ConfigError(f"{source}: hidden_size {width} is not divisible by num_attention_heads {heads}")
    vision_cfg: dict[str, Any] = {
        "image_size": int(vc.get("image_size", 224)),
        "layers": layers,
        "width": width,
        "patch_size": int(vc.get("patch_size", 32)),
    }
    if width // heads != 64:
        vision_cfg["head_width"] = width // heads
    if mlp != 4 * width:
        vision_cfg["mlp_ratio"] = mlp / width
    return {"embed_dim": int(config.get("projection_dim", 512)), "quick_gelu": _ACTS[act],
            "vision_cfg": vision_cfg}


def is_hf_clip_state_dict(state: Mapping[str, Any]) -> bool:
    """True when the keys are transformers CLIP names (``vision_model.*``), not open_clip's (``visual.*``)."""
    return any(k.startswith("vision_model.") for k in state)


def hf_clip_to_open_clip_visual(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict for open_clip's ``model.visual`` from a transformers CLIP state dict.

    Keys outside the image tower (text tower, ``logit_scale``) are ignored; ``position_ids`` buffers dropped.
    Raises ConfigError when an image-tower key is missing or unknown, so a partial mapping cannot load.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        if key in _TOP:
            out[_TOP[key]] = tensor
        elif key == "visual_projection.weight":
            out["proj"] = tensor.t().contiguous()     # nn.Linear [out,in] -> matrix used as x @ proj
        elif key.endswith("position_ids"):
            continue
        elif (m := _LAYER.match(key)):
            i, rest = int(m.group(1)), m.group(2)
            prefix = f"transformer.resblocks.{i}."
            if rest in _PER_LAYER:
                out[prefix + _PER_LAYER[rest]] = tensor
            elif (q := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)):
                qkv.setdefault(i, {})[f"{q.group(1)}.{q.group(2)}"] = tensor
            else:
                unknown.append(key)
        elif key.startswith("vision_model."):
            unknown.append(key)
    if unknown:
        raise ConfigError(f"unknown transformers CLIP vision key(s): {unknown[:5]}")
    for i, parts in sorted(qkv.items()):
        for kind in ("weight", "bias"):
            try:
                out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                    [parts[f"q.{kind}"], parts[f"k.{kind}"], parts[f"v.{kind}"]], dim=0)
            except KeyError as exc:
                raise ConfigError(f"layer {i}: missing attention {exc.args[0]} projection") from None
    if "proj" not in out:
        raise ConfigError("checkpoint has no visual_projection.weight (not a CLIPModel with projection?)")
    return out


def open_clip_visual_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``visual.*`` part of an open_clip full-model state dict, prefix removed.

    A state dict that is already the image tower alone (no ``visual.`` prefix) is returned as is.
    """
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if any(k.startswith("module.visual.") for k in state):   # saved from DataParallel/DDP
        return {k[len("module.visual."):]: v for k, v in state.items() if k.startswith("module.visual.")}
    return dict(state)
