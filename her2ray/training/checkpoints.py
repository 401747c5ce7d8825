"""Fold checkpoints on any store: the best model (``best.pt``) and discovery of a run's fold models.

Why a self-describing ``best.pt``: the scoring stage and heatmaps run on another day, maybe another
cluster, from only the run folder. The file therefore carries the model name, hyper-parameters, patch
dim, the encoder identity and feature settings the model was trained on, so a scorer can rebuild the
model and refuse features made by another encoder instead of silently mixing them.

Layout: ``RUN/folds/fold-<k>/`` is the Ray Train run folder of fold k (``RunConfig(name="fold-<k>")``);
``best.pt``, the fold's predictions, ``result.json`` and the ``DONE`` marker live beside Ray's own
checkpoint folders there.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from .. import storage
from ..errors import FeatureStoreError

FOLDS_DIR = "folds"
BEST_FILE = "best.pt"
DONE_FILE = "DONE"
RESULT_FILE = "result.json"
VAL_PRED_FILE = "val_predictions.parquet"
TEST_PRED_FILE = "test_predictions.parquet"
_FOLD_DIR = re.compile(r"fold-(\d+)$")


def fold_name(fold: int) -> str:
    """Ray Train run name of a fold; stable (no timestamp) so rerunning the same command resumes."""
    return f"fold-{int(fold)}"


def fold_dir(run_url: str, fold: int) -> str:
    return storage.join(run_url, FOLDS_DIR, fold_name(fold))


def save_best(url: str, payload: dict[str, Any]) -> None:
    """``torch.save`` to memory, then one atomic write (a reader never sees half a checkpoint)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    storage.write_bytes_atomic(url, buf.getvalue())


def read_checkpoint(url: str) -> dict[str, Any]:
    """The raw ``best.pt`` dict (tensors on CPU)."""
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        raise FeatureStoreError(f"{url}: checkpoint not found") from None
    # weights_only: our payloads are tensors + plain JSON-like data, so no pickle code ever runs.
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def load_best_model(url: str, device: str | torch.device = "cpu"):
    """Rebuild the model of one ``best.pt`` in eval mode; returns ``(model, checkpoint dict)``."""
    from ..models import build_model

    ckpt = read_checkpoint(url)
    model = build_model(ckpt["model_name"], ckpt["patch_dim"], ckpt["num_classes"], **ckpt["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    return model, ckpt


def fold_model_urls(run_url: str) -> list[tuple[int, str]]:
    """``[(fold, best.pt url)]`` of the folds that finished (have a ``best.pt``), sorted by fold."""
    fs, path = storage.filesystem_for(storage.join(run_url, FOLDS_DIR))
    out = []
    if not fs.exists(path):
        return out
    for entry in fs.ls(path, detail=False):
        m = _FOLD_DIR.search(entry.rstrip("/"))
        if not m:
            continue
        url = storage.join(fold_dir(run_url, int(m.group(1))), BEST_FILE)
        if storage.exists(url):
            out.append((int(m.group(1)), url))
    return sorted(out)


def load_fold_models(run_url: str, device: str | torch.device = "cpu",
                     return_checkpoints: bool = False) -> list[tuple]:
    """``[(fold, model)]``: every fold's best model of a training run, eval mode, on ``device``.

    With ``return_checkpoints`` the tuples are ``(fold, model, checkpoint dict)``; the dict carries
    ``data_settings`` (npk, max_nodes for ``BagDataset``), ``encoder`` and ``feature_settings`` (to refuse
    features made by another encoder). Raises ``FeatureStoreError`` when the run has no fold model.
    """
    found = fold_model_urls(run_url)
    if not found:
        raise FeatureStoreError(f"{run_url}: no fold checkpoints under {FOLDS_DIR}/fold-*/{BEST_FILE}")
    out = []
    for fold, url in found:
        model, ckpt = load_best_model(url, device)
        out.append((fold, model, ckpt) if return_checkpoints else (fold, model))
    return out
