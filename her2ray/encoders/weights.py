"""Where encoder weights come from: a Hugging Face hub id, a local folder, a single file, or nothing.

Why a separate module: the same resolution rules serve every encoder, and they are the part that touches
the network (``huggingface_hub.snapshot_download``, which caches and honours ``HF_HUB_OFFLINE``), so it is
kept away from the model code. Folder formats understood:

* transformers ``CLIPModel``: ``config.json`` (model_type ``clip``) + ``model.safetensors`` or
  ``pytorch_model.bin`` (PLIP's published format);
* open_clip: ``open_clip_config.json`` + ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..provenance import sha256_file

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HUB_PATTERNS = [OPEN_CLIP_CONFIG, HF_CONFIG, *OPEN_CLIP_WEIGHTS, *HF_WEIGHTS]
_HUB_ID = re.compile(r"^(?:hf-hub:|hf_hub:)?([A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@([\w.\-/]+))?$")


@dataclass(frozen=True)
class WeightsLocation:
    """A resolved weights source: ``fmt`` is 'open_clip' or 'transformers'; ``config`` the parsed JSON."""

    fmt: str
    weights_file: str
    config: dict[str, Any] | None
    source: str


def parse_hub_id(value: str) -> tuple[str, str | None] | None:
    """``org/name[@revision]`` (optionally prefixed ``hf-hub:``) -> (repo_id, revision); None otherwise.

    A string naming an existing local path is never a hub id.
    """
    if os.path.exists(value):
        return None
    m = _HUB_ID.match(value)
    return (m.group(1), m.group(2)) if m else None


def download_hub(repo_id: str, revision: str | None = None) -> str:
    """Local snapshot folder of a hub repo (configs and weights only); cached by huggingface_hub."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - network, auth, offline cache miss: all need the same advice
        raise ConfigError(
            f"cannot fetch encoder weights {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "on an offline machine download it once elsewhere and pass the local folder as --weights") from None


def locate(path: str, source: str | None = None) -> WeightsLocation:
    """Find the config and weights file in a local folder, or classify a single weights file."""
    source = source or f"local:{os.path.abspath(path)}"
    if os.path.isfile(path):
        return WeightsLocation("state_dict", path, None, source)
    if not os.path.isdir(path):
        raise ConfigError(f"encoder weights {path!r}: no such file or folder, and not a hub id (org/name)")
    files = set(os.listdir(path))
    if OPEN_CLIP_CONFIG in files:
        for name in OPEN_CLIP_WEIGHTS:
            if name in files:
                return WeightsLocation("open_clip", os.path.join(path, name),
                                       _read_json(os.path.join(path, OPEN_CLIP_CONFIG)), source)
        raise ConfigError(f"{path}: has {OPEN_CLIP_CONFIG} but none of {list(OPEN_CLIP_WEIGHTS)}")
    if HF_CONFIG in files:
        for name in HF_WEIGHTS:
            if name in files:
                return WeightsLocation("transformers", os.path.join(path, name),
                                       _read_json(os.path.join(path, HF_CONFIG)), source)
        raise ConfigError(f"{path}: has {HF_CONFIG} but none of {list(HF_WEIGHTS)} (sharded checkpoints "
                          "are not supported; re-save with save_pretrained(max_shard_size='2GB'))")
    raise ConfigError(f"{path}: not an encoder folder: expected {OPEN_CLIP_CONFIG} (open_clip) or "
                      f"{HF_CONFIG} (transformers CLIPModel); found {sorted(files)[:10]}")


def resolve(weights: str) -> WeightsLocation:
    """Local path, or hub id downloaded to the local cache first."""
    hub = parse_hub_id(weights)
    if hub is not None:
        repo_id, revision = hub
        folder = download_hub(repo_id, revision)
        return locate(folder, source=f"hf-hub:{repo_id}" + (f"@{revision}" if revision else ""))
    return locate(os.path.expanduser(weights))


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch pickle (loaded with ``weights_only=True``: no code runs)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
        raise ConfigError(f"{path}: cannot read encoder weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a state dict (got {type(state).__name__})")
    return state


def file_sha256(path: str) -> str:
    return sha256_file(path)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of tensors (names, dtypes, shapes, bytes): identifies weights that have no file."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
