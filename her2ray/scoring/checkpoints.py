"""Find and load a training run's fold checkpoints (``RUN/folds/<k>/best.pt``) for inference.

Why here and not only ``her2ray.training.load_fold_models``: scoring needs more than the modules. It needs
the bag settings the models were trained with (``npk``, ``max_nodes``: build_kernels must be called exactly as
in training), the encoder identity (features from another encoder must be refused, not scored) and a content
hash of every checkpoint (the model identity written next to each prediction). So we read each ``best.pt``
once, keep its metadata, and build the module from it with ``her2ray.models.build_model``.

``best.pt`` contract (training): ``torch.save`` of a dict with ``state_dict, model_name, hparams, patch_dim,
num_classes, fold, epoch, val_metrics, encoder (identity), feature settings``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from .. import storage
from ..errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "best.pt"
FOLDS_DIR = "folds"
DEFAULT_NPK = 144
DEFAULT_MAX_NODES = 4096


@dataclass(frozen=True)
class CheckpointRef:
    """One fold's checkpoint file, located in the run folder (cheap: nothing is loaded yet)."""

    fold: int
    url: str


@dataclass
class FoldCheckpoint:
    """A loaded checkpoint: its raw dict (minus weights), content hash and the settings scoring needs."""

    fold: int
    url: str
    sha256: str
    model_name: str
    patch_dim: int
    num_classes: int
    hparams: dict[str, Any]
    npk: int
    max_nodes: int
    encoder: dict[str, Any] | None
    state_dict: dict[str, Any] = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


def find_fold_checkpoints(run_url: str) -> list[CheckpointRef]:
    """``RUN/folds/<k>/best.pt`` for every fold folder that has one, sorted by fold number.

    Raises ``ConfigError`` when the run has no checkpoint at all: scoring with an empty ensemble is a user
    error (wrong ``--model`` path, or training not finished), better reported before Ray starts.
    """
    folds_url = storage.join(run_url, FOLDS_DIR)
    fs, path = storage.filesystem_for(folds_url)
    refs: list[CheckpointRef] = []
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - not every filesystem caches listings
        pass
    if fs.exists(path):
        for entry in fs.ls(path, detail=True):
            if entry.get("type") != "directory":
                continue
            name = posixpath.basename(str(entry["name"]).rstrip("/"))
            match = re.fullmatch(r"(?:fold[_-]?)?(\d+)", name)
            if not match:
                continue
            url = storage.join(folds_url, name, CHECKPOINT_FILE)
            if storage.exists(url):
                refs.append(CheckpointRef(fold=int(match.group(1)), url=url))
    if not refs:
        raise ConfigError(f"{run_url}: no fold checkpoints found (expected {FOLDS_DIR}/<k>/{CHECKPOINT_FILE}); "
                          "is this a finished `her2ray train` run folder?")
    return sorted(refs, key=lambda r: r.fold)


def run_id_of(run_url: str) -> str:
    """The training run's id from ``RUN/run.json`` (``run_id``), else the run folder's name."""
    url = storage.join(run_url, "run.json")
    try:
        record = json.loads(storage.read_text(url))
    except (FileNotFoundError, ValueError):
        record = {}
    rid = record.get("run_id") if isinstance(record, dict) else None
    return str(rid) if rid else posixpath.basename(str(run_url).rstrip("/"))


def ensemble_sha256(fold_shas: list[str]) -> str:
    """One fingerprint for the ensemble: sha256 of the sorted per-fold checkpoint hashes."""
    return hashlib.sha256("\n".join(sorted(fold_shas)).encode()).hexdigest()


def checkpoint_sha256(url: str) -> str:
    """Content hash of a checkpoint, streamed (no full read in memory)."""
    fs, path = storage.filesystem_for(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensemble_identity(run_url: str) -> dict[str, Any]:
    """What identifies the model that scored a cohort: run id, per-fold checkpoint hashes, one combined hash."""
    refs = find_fold_checkpoints(run_url)
    folds = [{"fold": r.fold, "url": r.url, "sha256": checkpoint_sha256(r.url)} for r in refs]
    return {"run_url": str(run_url), "run_id": run_id_of(run_url), "folds": folds,
            "sha256": ensemble_sha256([f["sha256"] for f in folds])}


def _lookup(ckpt: dict[str, Any], key: str) -> Any:
    """A bag setting may sit at the top level, in ``hparams`` or in a feature/bag settings dict."""
    if key in ckpt:
        return ckpt[key]
    for section in ("data_settings", "hparams", "bag", "bag_settings", "feature_settings", "features",
                    "settings", "config"):
        sub = ckpt.get(section)
        if isinstance(sub, dict) and key in sub:
            return sub[key]
    return None


def _torch_load(data: bytes, url: str) -> dict[str, Any]:
    import pickle

    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
        # Our own run files may hold plain-Python extras (numpy scalars in val_metrics) that the safe loader
        # refuses; the run folder is produced by `her2ray train`, so it is trusted input here.
        log.debug("%s: weights_only load refused, loading as a trusted her2ray checkpoint", url)
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise ConfigError(f"{url}: not a her2ray checkpoint (expected a dict with 'state_dict')")
    return obj


def load_checkpoint(ref: CheckpointRef) -> FoldCheckpoint:
    """Read one ``best.pt`` (local or remote) and extract the settings scoring needs."""
    data = storage.read_bytes(ref.url)
    ckpt = _torch_load(data, ref.url)
    missing = [k for k in ("model_name", "patch_dim", "num_classes") if k not in ckpt]
    if missing:
        raise ConfigError(f"{ref.url}: checkpoint lacks {missing}")
    hparams = dict(ckpt.get("hparams") or {})
    npk = _lookup(ckpt, "npk")
    max_nodes = _lookup(ckpt, "max_nodes")
    encoder = ckpt.get("encoder") or ckpt.get("encoder_identity")
    rest = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return FoldCheckpoint(
        fold=int(ckpt.get("fold", ref.fold)), url=ref.url, sha256=hashlib.sha256(data).hexdigest(),
        model_name=str(ckpt["model_name"]), patch_dim=int(ckpt["patch_dim"]),
        num_classes=int(ckpt["num_classes"]), hparams=hparams,
        npk=int(npk) if npk is not None else DEFAULT_NPK,
        max_nodes=int(max_nodes) if max_nodes is not None else DEFAULT_MAX_NODES,
        encoder=dict(encoder) if isinstance(encoder, dict) else None,
        state_dict=ckpt["state_dict"], extra=rest)


def build_module(ckpt: FoldCheckpoint, device: str = "cpu"):
    """The fold's ``torch.nn.Module`` in eval mode with its trained weights, on ``device``."""
    from ..models import build_model

    model = build_model(ckpt.model_name, ckpt.patch_dim, ckpt.num_classes, **ckpt.hparams)
    # DataParallel-trained weights carry a "module." prefix; the module itself does not.
    state = {k.removeprefix("module."): v for k, v in ckpt.state_dict.items()}
    model.load_state_dict(state)
    return model.to(device).eval()
