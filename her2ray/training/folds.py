"""The Ray Train layer: one ``TorchTrainer`` run per fold, all folds at once, resumable.

Why one TorchTrainer per fold: each fold gets Train's checkpoint manager, failure policy and
resume-by-name (``RunConfig(name="fold-<k>", storage_path=RUN/folds)``), and can grow to DDP later
without changes here. Why threads: ``TrainController.fit()`` blocks, and V2 supports ``fit()`` off the
main thread (it only skips its SIGINT handler), so a thread pool in the driver is the simplest way to run
the k fits concurrently; Ray then packs the fold workers onto the cluster by their
``resources_per_worker`` (fractional CPU/GPU), see ray-notes section 2.3. The heavy lifting
(``loop.train_fold``) knows nothing about Ray.

Resume: a fold with a ``DONE`` marker is skipped entirely; an unfinished one is re-launched under the
same name, Train hands its latest checkpoint to the worker (``ray.train.get_checkpoint()``) and the loop
continues from the saved epoch with its optimizer, best-so-far and patience counter.
"""

from __future__ import annotations

import logging
import os
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .. import storage
from . import checkpoints as ck
from .config import TrainConfig
from .loop import FoldSpec, is_done, read_result, train_fold

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def _train_fn(config: dict[str, Any]) -> dict[str, Any]:
    """Body of a fold's Ray Train worker: restore, train, report one checkpoint per epoch."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    spec = FoldSpec.from_dict(config["spec"])   # torch threads are pinned by train_fold (determinism.py)
    if spec.pid_marker_dir:                     # fault drills find (and kill -9) this fold's worker by it
        open(os.path.join(spec.pid_marker_dir, f"fold-{spec.fold}.{os.getpid()}"), "w").close()
    resume_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume_state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)

    def on_epoch_end(state: dict[str, Any], metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, STATE_FILE))
            clean = {k: (float("nan") if v is None else v) for k, v in metrics.items()}
            ray.train.report(clean, checkpoint=Checkpoint.from_directory(d))

    return train_fold(spec, resume_state=resume_state, on_epoch_end=on_epoch_end,
                      device=ray.train.torch.get_device())


def ray_storage(url: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for RunConfig: local abs path, or an fsspec-backed pyarrow fs.

    Object stores go through the same fsspec filesystem as every other her2ray write (one set of
    credentials/endpoint settings), wrapped for pyarrow as Ray Train expects.
    """
    if storage.is_local(url):
        return os.path.abspath(storage.local_path(url)), None
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_for(url)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def scaling_config(cfg: TrainConfig, local: bool = False):
    """One worker per fold; fractional CPU/GPU so several folds share a node (or a GPU)."""
    from ray.train import ScalingConfig

    if local:
        return ScalingConfig(num_workers=0)
    resources: dict[str, float] = {"CPU": cfg.cpus_per_fold}
    if cfg.gpus_per_fold > 0:
        resources["GPU"] = cfg.gpus_per_fold
    return ScalingConfig(num_workers=1, use_gpu=cfg.gpus_per_fold > 0, resources_per_worker=resources)


def fit_fold(spec: FoldSpec, folds_url: str, local: bool = False) -> dict[str, Any]:
    """Run (or resume, or skip when DONE) one fold's TorchTrainer; return the fold's result dict."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    if is_done(spec.out_dir):
        log.info("fold %d already done: skipped", spec.fold)
        return {**read_result(spec.out_dir), "skipped": True}
    cfg = TrainConfig.from_mapping(spec.config)
    storage_path, storage_fs = ray_storage(folds_url)
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={"spec": spec.to_dict()},
        scaling_config=scaling_config(cfg, local),
        run_config=RunConfig(
            name=ck.fold_name(spec.fold), storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # resume state only; best.pt is ours
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    trainer.fit()
    return {**read_result(spec.out_dir), "skipped": False}


def run_folds(specs: list[FoldSpec], folds_url: str, max_concurrent: int = 0,
              local: bool = False) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Fit every fold, concurrently (``max_concurrent`` threads; 0 = all); ``local`` = sequential local mode.

    Returns ``(results by fold, error text by fold)``; one failed fold never stops the others.
    """
    results: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}

    def one(spec: FoldSpec):
        try:
            return spec.fold, fit_fold(spec, folds_url, local), None
        except Exception as exc:  # noqa: BLE001 - reported per fold, the run raises afterwards
            log.error("fold %d failed: %s", spec.fold, exc)
            return spec.fold, None, "".join(traceback.format_exception_only(type(exc), exc)).strip()

    if local:
        outcomes = [one(s) for s in specs]
    else:
        workers = max_concurrent or len(specs)
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="her2ray-fold") as pool:
            outcomes = list(pool.map(one, specs))
    for fold, res, err in outcomes:
        if err is None:
            results[fold] = res
        else:
            errors[fold] = err
    return results, errors
