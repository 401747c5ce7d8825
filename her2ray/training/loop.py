"""Train one cross-validation fold: the engine, with no Ray in it.

Why no Ray here: the same function runs inside a Ray Train worker (``folds.py``), directly in a test, or
in a GPU benchmark. Persistence of the *resume* state is delegated to the caller through
``on_epoch_end(state, metrics)`` (Ray Train turns it into a reported checkpoint); the engine itself only
writes the fold's durable outputs (``best.pt``, predictions, ``result.json``, then ``DONE``) to the fold
folder, which may be local or ``s3://``.

Recipe (kat.md section 6, official KAT): Adam (lr 1e-4, no weight decay), plain cross-entropy with a
class-balanced ``WeightedRandomSampler`` (or, as an option, class-weighted cross-entropy with uniform
sampling), random tile-dropout augmentation (``BagDataset(aug_rate=...)``), LR constant (the official
StepLR never fires). Our additions: validation every epoch, early stopping with ``patience`` on the
validation macro one-vs-rest AUC (validation loss breaks ties), best-epoch checkpoint. Everything is
seeded from ``spec.seed`` (torch, numpy, python, sampler generator).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from .. import __version__, storage
from ..labels import NUM_CLASSES, PROB_COLUMNS
from . import checkpoints as ck
from .config import TrainConfig
from .determinism import compute_record, pinned_compute

log = logging.getLogger(__name__)

AUC_TOL = 1e-6


@dataclass
class FoldSpec:
    """Everything one fold needs, as plain JSON-able data (it travels to a Ray worker)."""

    fold: int
    out_dir: str                      # RUN/folds/fold-<k> (local path or URL)
    config: dict[str, Any]            # TrainConfig.to_dict()
    patch_dim: int
    seed: int
    train_ids: list[str]
    train_urls: list[str]
    train_labels: list[int]
    val_ids: list[str]
    val_urls: list[str]
    val_labels: list[int]
    test_ids: list[str] = field(default_factory=list)
    test_urls: list[str] = field(default_factory=list)
    test_labels: list[int] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)   # encoder identity, feature settings
    fail_after_epoch: int | None = None   # test hook: raise after this many epochs on a fresh start
    pid_marker_dir: str | None = None     # test hook: the fold's worker writes <dir>/fold-<k>.<pid> at its start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FoldSpec":
        return cls(**data)


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_after_epoch`` test hook to simulate a node lost mid-fold."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator that drives the sampler."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def class_weights(labels: list[int], num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """n / (C_present * count_c) per class (0 for absent classes): the 'balanced' weighting."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def balanced_sampler(labels: list[int], generator: torch.Generator) -> WeightedRandomSampler:
    """Official KAT sampler: weight 1/count[label] per slide, len(train) draws with replacement."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    weights = [1.0 / counts[y] for y in labels]
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=generator)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _forward(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    from ..models import forward_batch

    return forward_batch(model, batch)


@torch.no_grad()
def predict_loader(model: nn.Module, loader, device: torch.device) -> tuple[list[str], np.ndarray, np.ndarray, float]:
    """``(slide_ids, labels [n], probs [n, C], mean CE loss)`` of a model over a loader, eval mode."""
    model.eval()
    ids, labels, probs, losses = [], [], [], []
    for batch in loader:
        batch = _to_device(batch, device)
        logits = _forward(model, batch).float()
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        ids.extend(batch["slide_ids"])
        if batch.get("labels") is not None:
            lab = batch["labels"]
            labels.append(lab.cpu().numpy())
            losses.append(nn.functional.cross_entropy(logits, lab, reduction="sum").item())
    n = len(ids)
    p = np.concatenate(probs) if probs else np.zeros((0, NUM_CLASSES))
    y = np.concatenate(labels) if labels else np.full(n, -1)
    return ids, y.astype(np.int64), p.astype(np.float64), (float(np.sum(losses)) / n if n and losses else float("nan"))


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Selection metric: the reports module's ``auc_macro_ovr`` (None when undefined)."""
    from ..reports.metrics import classification_metrics

    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return None
    return classification_metrics(labels, probs)["auc_macro_ovr"]


def is_improvement(auc: float | None, loss: float, best_auc: float | None, best_loss: float) -> bool:
    """Higher val macro AUC wins; equal AUC (within 1e-6, or both undefined) -> lower val loss wins."""
    a = -np.inf if auc is None else auc
    b = -np.inf if best_auc is None else best_auc
    if a > b + AUC_TOL:
        return True
    if abs(a - b) <= AUC_TOL or (a == b):
        return loss < best_loss
    return False


def predictions_table(ids: list[str], labels: np.ndarray, probs: np.ndarray, fold: int) -> pa.Table:
    cols = {"slide_id": pa.array(ids, pa.string()), "fold": pa.array([fold] * len(ids), pa.int64()),
            "label": pa.array(labels.astype(np.int64))}
    for j, name in enumerate(PROB_COLUMNS):
        cols[name] = pa.array(probs[:, j].astype(np.float64)) if len(ids) else pa.array([], pa.float64())
    return pa.table(cols)


def _make_loaders(spec: FoldSpec, cfg: TrainConfig, generator: torch.Generator):
    from ..models import collate_for, make_dataset

    ds_kw = cfg.data_settings()
    collate_bags = collate_for(cfg.model)
    train_ds = make_dataset(cfg.model, spec.train_urls, spec.train_labels, aug_rate=cfg.aug_rate, seed=spec.seed,
                            **ds_kw)
    sampler = balanced_sampler(spec.train_labels, generator) if cfg.balance == "sampler" else None
    train_dl = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, shuffle=sampler is None,
                          generator=generator if sampler is None else None, collate_fn=collate_bags,
                          num_workers=0, drop_last=False)

    def eval_loader(urls, labels):
        if not urls:
            return None
        ds = make_dataset(cfg.model, urls, labels, aug_rate=0.0, seed=spec.seed, **ds_kw)
        return DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate_bags,
                          num_workers=0)

    return train_ds, train_dl, eval_loader(spec.val_urls, spec.val_labels), eval_loader(spec.test_urls,
                                                                                        spec.test_labels)


def train_fold(spec: FoldSpec, *, resume_state: dict[str, Any] | None = None,
               on_epoch_end: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
               device: str | torch.device | None = None) -> dict[str, Any]:
    """Train fold ``spec.fold`` to early stop / ``max_epochs``; write its outputs; return its result dict.

    ``resume_state`` is a dict previously handed to ``on_epoch_end`` (model, optimizer, epoch, best-so-far,
    patience counter, sampler and RNG states); training continues at its ``epoch``. The whole fold runs with
    ``cfg.torch_threads`` torch threads (``determinism.pinned_compute``) so its bits do not depend on where
    or next to what it runs; nothing in it reads a clock except for the logged timings.
    """
    cfg = TrainConfig.from_mapping(spec.config, source=f"fold {spec.fold} config")
    with pinned_compute(cfg.torch_threads, cfg.deterministic):
        return _train_fold(spec, cfg, resume_state, on_epoch_end, device)


def _train_fold(spec: FoldSpec, cfg: TrainConfig, resume_state, on_epoch_end, device) -> dict[str, Any]:
    from ..models import build_model

    started = time.time()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and cfg.gpus_per_fold > 0 else "cpu"))
    gen = seed_everything(spec.seed)
    hparams = cfg.model_hparams()
    model = build_model(cfg.model, spec.patch_dim, NUM_CLASSES, **hparams).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weight = class_weights(spec.train_labels).to(device) if cfg.balance == "loss" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)

    state = {"epoch": 0, "best_auc": None, "best_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0,
             "history": [], "stopped_early": False, "first_started_at": started}
    if resume_state:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        gen.set_state(resume_state["sampler_generator"])
        torch.set_rng_state(resume_state["torch_rng"])
        name, keys, pos, has_gauss, cached = resume_state["numpy_rng"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        state.update({k: resume_state[k] for k in state})
    start_epoch = state["epoch"]
    best_url = storage.join(spec.out_dir, ck.BEST_FILE)
    best_state = None
    train_ds, train_dl, val_dl, test_dl = _make_loaders(spec, cfg, gen)
    log.info("fold %d: %d train / %d val / %d test slides, epochs %d..%d on %s", spec.fold,
             len(spec.train_ids), len(spec.val_ids), len(spec.test_ids), start_epoch, cfg.max_epochs, device)

    epoch = start_epoch
    while epoch < cfg.max_epochs and not state["stopped_early"]:
        t0 = time.time()
        train_ds.set_epoch(epoch)  # epoch-specific, reproducible tile-dropout draws
        model.train()
        total, seen = 0.0, 0
        for batch in train_dl:
            batch = _to_device(batch, device)
            logits = _forward(model, batch)
            loss = loss_fn(logits.float(), batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(batch["slide_ids"])
            seen += len(batch["slide_ids"])
        _, vy, vp, vloss = predict_loader(model, val_dl, device)
        vauc = macro_auc(vy, vp)
        improved = is_improvement(vauc, vloss, state["best_auc"], state["best_loss"])
        if improved:
            state.update(best_auc=vauc, best_loss=vloss, best_epoch=epoch, bad_epochs=0)
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            ck.save_best(best_url, _best_payload(spec, cfg, hparams, best_state, epoch, vauc, vloss))
        else:
            state["bad_epochs"] += 1
        metrics = {"fold": spec.fold, "epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": vloss,
                   "val_auc": vauc, "val_accuracy": float(np.mean(vp.argmax(1) == vy)) if len(vy) else None,
                   "best_val_auc": state["best_auc"], "best_epoch": state["best_epoch"],
                   "seconds": time.time() - t0, "ended_at": time.time()}
        state["history"].append(metrics)
        epoch += 1
        state["epoch"] = epoch
        if state["bad_epochs"] >= cfg.patience:
            state["stopped_early"] = True
        if on_epoch_end is not None:
            on_epoch_end(_resume_payload(state, model, opt, gen), metrics)
        log.info("fold %d epoch %d: train_loss %.4f val_loss %.4f val_auc %s%s", spec.fold, metrics["epoch"],
                 metrics["train_loss"], vloss, vauc, " *" if improved else "")
        if spec.fail_after_epoch is not None and start_epoch == 0 and epoch >= spec.fail_after_epoch:
            raise InjectedFailure(f"fold {spec.fold}: injected failure after epoch {epoch - 1} (test hook)")

    return _finish(spec, cfg, model, best_state, best_url, val_dl, test_dl, device, state, start_epoch, started)


def _best_payload(spec, cfg, hparams, state_dict, epoch, vauc, vloss) -> dict[str, Any]:
    return {"state_dict": state_dict, "model_name": cfg.model, "hparams": hparams, "patch_dim": spec.patch_dim,
            "num_classes": NUM_CLASSES, "fold": spec.fold, "epoch": epoch,
            "val_metrics": {"auc_macro_ovr": vauc, "loss": vloss},
            "encoder": spec.provenance.get("encoder"), "feature_settings": spec.provenance.get("feature_settings"),
            "data_settings": {"npk": cfg.npk, "max_nodes": cfg.max_nodes},
            "her2ray_version": __version__, "config": cfg.protocol_dict()}


def _resume_payload(state, model, opt, gen) -> dict[str, Any]:
    return {**copy.deepcopy(state), "model": model.state_dict(), "optimizer": opt.state_dict(),
            "sampler_generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "numpy_rng": _numpy_state()}


def _numpy_state() -> list:
    """numpy's legacy RNG state as plain lists, so checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _finish(spec, cfg, model, best_state, best_url, val_dl, test_dl, device, state, start_epoch, started):
    """Reload the best epoch, predict val + test, write predictions, result.json, then DONE (last)."""
    if best_state is None:  # resumed after the best epoch: it is on the store
        best_state = ck.read_checkpoint(best_url)["state_dict"]
    model.load_state_dict(best_state)
    ids, y, p, vloss = predict_loader(model, val_dl, device)
    storage.write_parquet_atomic(predictions_table(ids, y, p, spec.fold), storage.join(spec.out_dir, ck.VAL_PRED_FILE))
    from ..reports.metrics import classification_metrics

    result: dict[str, Any] = {
        "fold": spec.fold, "model": cfg.model, "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
        "start_epoch": start_epoch, "stopped_early": state["stopped_early"], "best_val_auc": state["best_auc"],
        "val_metrics": classification_metrics(y, p) if len(ids) else None, "test_metrics": None,
        "history": state["history"], "n_train": len(spec.train_ids), "n_val": len(spec.val_ids),
        "n_test": len(spec.test_ids), "started_at": started,
        "first_started_at": state["first_started_at"], "host": socket.gethostname(), "pid": os.getpid(),
        "device": str(device), "compute": compute_record(cfg.torch_threads, cfg.deterministic, device),
    }
    if test_dl is not None:
        tids, ty, tp, _ = predict_loader(model, test_dl, device)
        storage.write_parquet_atomic(predictions_table(tids, ty, tp, spec.fold),
                                     storage.join(spec.out_dir, ck.TEST_PRED_FILE))
        if len(tids) and (ty >= 0).all():
            result["test_metrics"] = classification_metrics(ty, tp)
    result["finished_at"] = time.time()
    text = json.dumps(result, indent=2, default=_json_default)
    storage.write_text_atomic(storage.join(spec.out_dir, ck.RESULT_FILE), text)
    storage.write_text_atomic(storage.join(spec.out_dir, ck.DONE_FILE),
                              json.dumps({"fold": spec.fold, "finished_at": result["finished_at"]}))
    log.info("fold %d done: best epoch %d, val macro AUC %s", spec.fold, state["best_epoch"], state["best_auc"])
    return result


def _json_default(obj: Any):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def read_result(out_dir: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(out_dir, ck.RESULT_FILE)))


def is_done(out_dir: str) -> bool:
    return storage.exists(storage.join(out_dir, ck.DONE_FILE))
