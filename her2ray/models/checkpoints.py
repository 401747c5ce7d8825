"""Loading official KAT checkpoints (and her2ray ones) into :class:`KernelAttentionTransformer`.

Why: the official training scripts save ``{'epoch', 'state_dict', 'optimizer'[, 'args']}`` with optional
``module.`` (DataParallel) prefixes, and KATCL runs wrap the classifier as ``online_kat.`` next to an EMA
``target_kat.`` and BYOL heads. Some hyperparameters (heads, npk) cannot be recovered from tensor shapes and
live only in the saved argparse ``args``. This module unwraps all of that and fails loudly, naming keys,
when the weights do not fit (kat.md section 8).

Security: files are read with ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allow-listed,
which covers the official files. ``trusted=True`` falls back to full unpickling (``weights_only=False``),
which can execute code: use it only for files you trust.
"""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Mapping
from typing import Any

import torch

from .. import storage
from ..errors import Her2RayError
from .kat import KernelAttentionTransformer


class CheckpointError(Her2RayError, ValueError):
    """A checkpoint cannot be read or does not fit a KAT model; the message names the offending keys."""


#: Official ``args`` attribute -> our constructor argument.
OFFICIAL_ARG_NAMES: dict[str, str] = {
    "trfm_dim": "dim", "trfm_depth": "depth", "trfm_heads": "heads", "trfm_dim_head": "dim_head",
    "trfm_mlp_dim": "mlp_dim", "npk": "npk", "input_dim": "patch_dim", "num_classes": "num_classes",
}
_CONSTRUCTOR_ARGS = ("patch_dim", "num_classes", "dim", "depth", "heads", "dim_head", "mlp_dim", "npk",
                     "dropout", "emb_dropout")
_DROP_PREFIXES = ("target_kat.", "target_projector.", "online_projector.", "predictor.")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint(path_or_url: str, trusted: bool = False) -> Any:
    """``torch.load`` a local path or URL on CPU, allowing ``argparse.Namespace`` under ``weights_only``."""
    source = str(path_or_url)
    try:
        data: Any = storage.local_path(source) if storage.is_local(source) else io.BytesIO(storage.read_bytes(source))
    except FileNotFoundError:
        raise CheckpointError(f"{source}: checkpoint not found") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(data, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{source}: checkpoint not found") from None
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError for disallowed globals
        if not trusted:
            raise CheckpointError(
                f"{source}: cannot be read with weights_only=True ({type(exc).__name__}: {exc}). If you trust "
                "this file, pass trusted=True to unpickle it fully") from None
    if isinstance(data, io.BytesIO):
        data.seek(0)
    return torch.load(data, map_location="cpu", weights_only=False)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def unwrap_state_dict(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (KAT state_dict with official key names, saved hyperparameters found in the checkpoint).

    Handles ``{'state_dict': ...}`` wrappers, bare state dicts, ``module.`` / ``_orig_mod.`` prefixes, and KATCL
    (keeps ``online_kat.*``, drops ``target_*``, projectors and predictor). Hyperparameters come from an
    official ``args`` Namespace (or dict) and/or a her2ray ``hparams`` dict (her2ray wins).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint must be a dict, got {type(obj).__name__}")
    saved: dict[str, Any] = {}
    args = obj.get("args")
    if args is not None:
        arg_map = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
        for official, ours in OFFICIAL_ARG_NAMES.items():
            if arg_map.get(official) is not None:
                saved[ours] = arg_map[official]
    if isinstance(obj.get("hparams"), Mapping):
        saved.update({k: v for k, v in obj["hparams"].items() if k in _CONSTRUCTOR_ARGS and v is not None})
    for key in ("patch_dim", "num_classes"):
        if isinstance(obj.get(key), int):
            saved.setdefault(key, obj[key])

    raw = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    tensors = {_strip(str(k)): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("checkpoint holds no tensors (expected a state_dict or {'state_dict': ...})")
    if any(k.startswith("online_kat.") for k in tensors):
        tensors = {k[len("online_kat."):]: v for k, v in tensors.items() if k.startswith("online_kat.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(_DROP_PREFIXES)}
    return tensors, saved


def infer_hparams(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Sizes recoverable from tensor shapes: patch_dim, num_classes, dim, depth, mlp_dim, inner_dim."""
    need = ("cls_token", "to_patch_embedding.weight", "mlp_head.1.weight", "kt.layers.0.1.to_qkv.weight",
            "kt.layers.0.2.fn.net.0.weight")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise CheckpointError(f"not a KAT state_dict: missing key(s) {missing}; "
                              f"found e.g. {sorted(state_dict)[:8]}")
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"kt\.layers\.(\d+)\.", k))}
    return {
        "dim": int(state_dict["cls_token"].shape[-1]),
        "patch_dim": int(state_dict["to_patch_embedding.weight"].shape[1]),
        "num_classes": int(state_dict["mlp_head.1.weight"].shape[0]),
        "depth": max(blocks) + 1,
        "mlp_dim": int(state_dict["kt.layers.0.2.fn.net.0.weight"].shape[0]),
        "inner_dim": int(state_dict["kt.layers.0.1.to_qkv.weight"].shape[0]) // 3,
    }


def _resolve_heads(inner: int, dim: int, has_to_out: bool, heads: int | None,
                   dim_head: int | None) -> tuple[int, int]:
    if heads is None and dim_head is None:
        if not has_to_out and inner == dim:   # official Identity-to_out layout: one head of size dim
            heads = 1
        elif inner % 64 == 0:                 # official default dim_head
            dim_head = 64
    if heads is not None and dim_head is None:
        dim_head = inner // heads
    elif dim_head is not None and heads is None:
        heads = inner // dim_head
    if heads is None or dim_head is None or heads * dim_head != inner:
        raise CheckpointError(f"to_qkv has inner size {inner} but heads={heads} x dim_head={dim_head} "
                              f"= {None if heads is None or dim_head is None else heads * dim_head}; "
                              "pass heads= / dim_head= that multiply to it")
    return int(heads), int(dim_head)


def load_official_checkpoint(path_or_dict: Any, patch_dim: int | None = None, num_classes: int | None = None,
                             *, trusted: bool = False, **hparams: Any) -> KernelAttentionTransformer:
    """A KernelAttentionTransformer (eval mode) holding a checkpoint's weights, loaded with ``strict=True``.

    Args:
        path_or_dict: local path / URL of a ``.pth.tar`` / ``.pt`` file, or an already-loaded object.
        patch_dim, num_classes: optional; checked against the weights (CheckpointError on disagreement).
        trusted: allow full unpickling if ``weights_only`` loading fails (see module docstring).
        **hparams: constructor arguments (``heads``, ``dim_head``, ``npk``, ``dropout``, ``emb_dropout``, ...).
            Precedence: explicit argument > saved ``hparams`` / official ``args`` > tensor shapes > defaults.

    Heads and npk are not recoverable from the weights: without ``args``/``hparams`` they default to
    dim_head=64 (heads = inner/64) and npk=144, the official defaults. ``model.checkpoint_info`` records the
    saved hyperparameters and what was dropped.
    """
    unknown = sorted(set(hparams) - set(_CONSTRUCTOR_ARGS))
    if unknown:
        raise TypeError(f"unknown KAT hyperparameter(s) {unknown}; known: {list(_CONSTRUCTOR_ARGS)}")
    obj = read_checkpoint(path_or_dict, trusted=trusted) if isinstance(path_or_dict, (str, bytes)) or hasattr(
        path_or_dict, "__fspath__") else path_or_dict
    state_dict, saved = unwrap_state_dict(obj)
    shapes = infer_hparams(state_dict)

    explicit = dict(hparams)
    if patch_dim is not None:
        explicit["patch_dim"] = patch_dim
    if num_classes is not None:
        explicit["num_classes"] = num_classes
    for key in ("patch_dim", "num_classes", "dim", "depth", "mlp_dim"):
        for origin, value in (("argument", explicit.get(key)), ("saved args/hparams", saved.get(key))):
            if value is not None and int(value) != shapes[key]:
                raise CheckpointError(f"{key}={value} ({origin}) disagrees with the checkpoint weights "
                                      f"({key}={shapes[key]})")
    chosen = {**{k: v for k, v in saved.items() if k in _CONSTRUCTOR_ARGS}, **explicit}
    has_to_out = "kt.layers.0.1.to_out.0.weight" in state_dict
    heads, dim_head = _resolve_heads(shapes["inner_dim"], shapes["dim"], has_to_out, chosen.get("heads"),
                                     chosen.get("dim_head"))
    kwargs = {k: shapes[k] for k in ("patch_dim", "num_classes", "dim", "depth", "mlp_dim")}
    kwargs.update(heads=heads, dim_head=dim_head)
    for key in ("npk", "dropout", "emb_dropout"):
        if chosen.get(key) is not None:
            kwargs[key] = chosen[key]
    try:
        model = KernelAttentionTransformer(**kwargs)
    except ValueError as exc:
        raise CheckpointError(f"cannot build KAT from the checkpoint: {exc}") from None

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                   for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected}")
        if wrong:
            parts.append(f"shape mismatch {wrong}")
        raise CheckpointError("checkpoint does not fit KernelAttentionTransformer"
                              f"({', '.join(f'{k}={v}' for k, v in kwargs.items())}): " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    model.checkpoint_info = {"saved_hparams": saved, "hparams": dict(model.hparams),  # type: ignore[attr-defined]
                             "n_tensors": len(state_dict)}
    return model
