"""Cohort scoring on Ray Data: slide ids in, one small prediction row per slide out.

Shape (ray-notes.md section 3, "rows = (slide_id, feature_uri)" variant):

    from_items([{slide_id, feature_url}], override_num_blocks=...)      # ids only: a few bytes per slide
      .map_batches(EnsembleScorer, compute=ActorPoolStrategy(size=actors), batch_size=batch_slides,
                   num_cpus=..., num_gpus=...)                            # loads every fold ONCE per actor
      .iter_batches(...)  -> driver collects the small rows, shows progress

Why this shape: features never travel through the object store or the driver. Each actor reads one slide's
Parquet file, scores it and drops it, so memory is flat whether the cohort has 10 or 10,000 slides; the driver
holds only the id list and the result rows (~0.3 KB per slide). Attention tables are written by the actor
itself (atomic per-slide files), never returned.

Slides that cannot be scored are never silently dropped: the driver first checks the feature store (catalog
status, file present) and the actor reports read/model failures; all land in ``failed.csv`` with the reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from pydantic import Field

from .. import console, resources, storage, watchdog
from ..ray_runtime import ensure_ray
from ..config import StageConfig
from ..errors import FeatureStoreError
from ..features.schema import (CATALOG_FILE, FEATURES_DIR, USABLE_STATUSES, feature_ids, feature_url,
                               read_catalog)
from ..labels import HER2_SCORES, PROB_COLUMNS, UNCAL_PROB_COLUMNS
from ..training.calibration import load_calibration
from ..training.operating_points import load_operating_points
from ..provenance import run_record, write_run_record
from .checkpoints import ensemble_identity
from .engine import ATTENTION_DIR, RESULT_SCHEMA, FoldEnsemble, empty_row, result_schema, rows_to_table, score_slide

log = logging.getLogger(__name__)

PREDICTIONS_PARQUET = "predictions.parquet"
PREDICTIONS_CSV = "predictions.csv"
FAILED_CSV = "failed.csv"
RUN_FILE = "run.json"

#: Columns written to predictions.parquet/csv, in this order (carried manifest columns follow).
PREDICTION_COLUMNS: tuple[str, ...] = (
    "slide_id", *PROB_COLUMNS, *UNCAL_PROB_COLUMNS, "pred_score", "her2_low", "fold_std",
    *(c.name for c in RESULT_SCHEMA if c.name.startswith("fold_std_")),
    "n_tiles", "n_tiles_used", "n_folds", "model_run_id", "model_sha256", "attention_url",
)
FAILED_COLUMNS: tuple[str, ...] = ("slide_id", "stage", "reason")


class ScoreConfig(StageConfig):
    """Settings of ``her2ray score`` (flags or YAML section ``score``)."""

    features: str = Field(..., description="feature store (folder or s3:// prefix) written by `her2ray embed`")
    model: str = Field(..., description="training run folder (RUN/folds/<k>/best.pt)")
    out: str = Field(..., description="output folder for predictions, attention and run.json")
    manifest: str | None = Field(None, description="subset of slides + columns carried into the predictions")
    attention: bool = False
    address: str | None = None
    batch_slides: int = Field(8, ge=1)
    actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    slide_timeout: float = Field(watchdog.DEFAULT_SLIDE_TIMEOUT_S, gt=0,
                                 description="seconds without progress on one slide before it is failed")
    max_worker_crashes: int = Field(watchdog.DEFAULT_MAX_CRASHES, ge=1)
    progress: bool = True


@dataclass
class ScoreSummary:
    """What a scoring run did (returned to the CLI, also recorded in run.json)."""

    out: str
    n_requested: int
    n_scored: int
    n_failed: int
    seconds: float
    class_counts: dict[str, int]
    n_her2_low: int
    model: dict[str, Any] = field(default_factory=dict)
    #: ray_start_s, actor_startup_s, scoring_s (see ``run_ray_scoring``)
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def startup_s(self) -> float:
        return self.timing.get("ray_start_s", 0.0) + self.timing.get("actor_startup_s", 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "n_requested": self.n_requested, "n_scored": self.n_scored,
                "n_failed": self.n_failed, "seconds": round(self.seconds, 3), "class_counts": self.class_counts,
                "n_her2_low": self.n_her2_low, "model_run_id": self.model.get("run_id"),
                "model_sha256": self.model.get("sha256"),
                "timing": {k: round(v, 3) for k, v in self.timing.items()}}


# ----------------------------------------------------------------------------------------------------
# Ray Data actor

class EnsembleScorer:
    """Callable-class UDF: one per actor; the fold ensemble is loaded once in ``__init__``."""

    def __init__(self, run_url: str, out_dir: str, attention: bool = False, device: str | None = None,
                 expected_sha256: str | None = None, num_threads: int | None = None,
                 guard: dict[str, Any] | None = None, ledger=None, plugins: str | None = None):
        watchdog.load_plugins(plugins)
        if num_threads:
            import torch

            torch.set_num_threads(max(1, int(num_threads)))  # no oversubscription next to other actors
        self.ensemble = FoldEnsemble.from_run(run_url, device=device, expected_sha256=expected_sha256)
        self.out_dir, self.attention = out_dir, attention
        self.guard = watchdog.Guard(ledger, watchdog.GuardConfig(**(guard or {})))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = [self.guard.run(str(sid), str(url), lambda sid=sid, url=url: self._score(str(sid), str(url)),
                               lambda reason, sid=sid: {**empty_row(str(sid)), "error": reason})
                for sid, url in zip(batch["slide_id"], batch["feature_url"])]
        return rows_to_table(rows, self.ensemble.schema)

    def _score(self, slide_id: str, url: str) -> dict[str, Any]:
        watchdog.beat("scoring")
        return score_slide(self.ensemble, slide_id, url, out_dir=self.out_dir, attention=self.attention)


# ----------------------------------------------------------------------------------------------------
# Driver side: which slides, with which feature file, and why the others are not scored

@dataclass
class ScoringPlan:
    todo: list[dict[str, str]]                 # {slide_id, feature_url}
    failed: list[dict[str, str]]               # {slide_id, stage, reason}
    order: list[str]                           # output order (manifest order, else sorted ids)
    carried: pa.Table | None                   # manifest columns to join on slide_id


def _read_catalog(store: str) -> tuple[set[str], dict[str, str]]:
    """(ids listed ok, {id: reason} for the others) from the store's slides.parquet; empty if none.

    Only the failed rows are kept as text: a 100k-slide catalog costs the driver a set of ids.
    """
    table = read_catalog(store)
    if table is None:
        return set(), {}
    ids = [str(v) for v in table.column("slide_id").to_pylist()]
    if "status" not in table.column_names:
        return set(ids), {}
    status = table.column("status").to_pylist()
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * len(ids)
    ok, bad = set(), {}
    for sid, st, err in zip(ids, status, errors):
        if not st or st in USABLE_STATUSES:
            ok.add(sid)
        else:
            bad[sid] = f"feature extraction {st}" + (f": {err}" if err else "")
    return ok, bad


def plan_scoring(store: str, manifest: str | None = None) -> ScoringPlan:
    """Decide which slides to score and list the others with a reason, before any worker starts."""
    catalog_ok, catalog_bad = _read_catalog(store)
    available = feature_ids(store)
    carried = None
    if manifest:
        from ..manifest import load_manifest, read_table

        rows = load_manifest(manifest, required=("slide_id",), optional_float=())
        ids = [r["slide_id"] for r in rows]
        del rows
        table = read_table(manifest)
        keep = [c for c in table.column_names if c != "slide_id"]
        clash = set(keep) & (set(PREDICTION_COLUMNS) | {"status", "error", "stage", "reason"})
        carried = pa.table({"slide_id": pa.array(ids, pa.string()),
                            **{(f"manifest_{c}" if c in clash else c): table.column(c) for c in keep}})
    else:
        ids = sorted(catalog_ok | set(catalog_bad) | available)
    if not ids:
        raise FeatureStoreError(f"{store}: no slides to score (no {CATALOG_FILE}, no {FEATURES_DIR}/*.parquet)")
    todo, failed = [], []
    for sid in ids:
        if sid in catalog_bad:
            failed.append({"slide_id": sid, "stage": "features", "reason": catalog_bad[sid]})
        elif sid not in available:
            where = "listed as ok in slides.parquet but" if sid in catalog_ok else "not in the feature store:"
            failed.append({"slide_id": sid, "stage": "features",
                           "reason": f"{where} no file {feature_url(store, sid)}"})
        else:
            todo.append({"slide_id": sid, "feature_url": feature_url(store, sid)})
    return ScoringPlan(todo=todo, failed=failed, order=ids, carried=carried)


# ----------------------------------------------------------------------------------------------------

def run_ray_scoring(plan_todo: list[dict[str, str]], cfg: ScoreConfig, identity: dict[str, Any],
                    on_batch=None, timing: dict[str, float] | None = None) -> pa.Table:
    """Score ``plan_todo`` on Ray Data; returns the result rows (``RESULT_SCHEMA``), unordered → sorted later.

    ``timing`` (filled in): ``ray_start_s``, ``actor_startup_s`` (actors up + fold models loaded until the first
    batch began), ``scoring_s`` (first batch began -> last batch done).
    """
    import ray

    timing = {} if timing is None else timing
    t_ray = time.perf_counter()
    ensure_ray(cfg.address, log_to_driver=False)
    timing["ray_start_s"] = time.perf_counter() - t_ray
    schema = result_schema(identity.get("flag_columns", ()))
    if not plan_todo:
        return rows_to_table([], schema)
    resources.check_fits({"CPU": cfg.cpus_per_actor, "GPU": cfg.gpus_per_actor}, resources.cluster_shapes(),
                         what="a scoring actor", hint="Lower --cpus-per-actor / --gpus-per-actor.")
    guard = watchdog.GuardConfig(timeout_s=cfg.slide_timeout, max_crashes=cfg.max_worker_crashes)
    ledger = watchdog.make_ledger()
    n = len(plan_todo)
    # Blocks are the unit of parallelism and retry: about one batch per block, enough blocks to feed the pool.
    num_blocks = max(1, min(n, max(math.ceil(n / cfg.batch_slides), 4 * cfg.actors)))
    ds = ray.data.from_items(plan_todo, override_num_blocks=num_blocks)
    device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
    ctx = ray.data.DataContext.get_current()
    saved_errored = ctx.max_errored_blocks
    ctx.max_errored_blocks = num_blocks          # a block dropped after the retry bound: reported per slide below
    with warnings.catch_warnings():              # retry bounds exist only as (deprecated) raw remote args in 2.60
        warnings.simplefilter("ignore")
        scored = ds.map_batches(
            EnsembleScorer,
            fn_constructor_kwargs={"run_url": cfg.model, "out_dir": cfg.out, "attention": cfg.attention,
                                   "device": device, "expected_sha256": identity["sha256"],
                                   "num_threads": max(1, int(cfg.cpus_per_actor)), "guard": guard.to_dict(),
                                   "ledger": ledger, "plugins": os.environ.get(watchdog.PLUGIN_ENV)},
            batch_size=cfg.batch_slides, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None, **watchdog.ray_task_options(guard),
        )
    parts = []
    saved_bars = ctx.enable_progress_bars
    if cfg.progress:
        ctx.enable_progress_bars = False        # our per-slide bar replaces Ray's per-operator bars
    t_start, work_started = time.perf_counter(), None
    try:
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            if work_started is None:   # the first batch's slides began this long before it arrived
                work_started = time.perf_counter() - float(pc.sum(batch.column("seconds")).as_py() or 0.0)
                timing["actor_startup_s"] = max(0.0, work_started - t_start)
            parts.append(batch)
            if on_batch is not None:
                on_batch(batch)
    finally:
        ctx.enable_progress_bars, ctx.max_errored_blocks = saved_bars, saved_errored
    if work_started is not None:
        timing["scoring_s"] = time.perf_counter() - work_started
    returned = {sid for p in parts for sid in p.column("slide_id").to_pylist()}
    missing = [t["slide_id"] for t in plan_todo if t["slide_id"] not in returned]
    if missing:
        flags = identity.get("flag_columns", ())
        report = watchdog.ledger_report(ledger)
        parts.append(rows_to_table([{**empty_row(sid, flags), "error": watchdog.missing_reason(sid, report, guard)}
                                    for sid in missing], schema))
    if not parts:
        return rows_to_table([], schema)
    return pa.concat_tables([p.select(schema.names).cast(schema) for p in parts])


def _order_table(table: pa.Table, order: list[str]) -> pa.Table:
    pos = {sid: i for i, sid in enumerate(order)}
    idx = np.argsort([pos.get(s, len(pos)) for s in table.column("slide_id").to_pylist()], kind="stable")
    return table.take(pa.array(idx, pa.int64()))


def _write_csv(table: pa.Table, url: str) -> None:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    storage.write_bytes_atomic(url, sink.getvalue().to_pybytes())


def build_outputs(results: pa.Table, plan: ScoringPlan) -> tuple[pa.Table, pa.Table]:
    """(predictions, failed) tables from the actors' rows and the driver's pre-checks."""
    ok_mask = pc.equal(results.column("status"), "ok")
    ok = _order_table(results.filter(ok_mask), plan.order)
    bad = results.filter(pc.invert(ok_mask))
    flags = [c for c in results.column_names if c not in RESULT_SCHEMA.names]   # screen_* of the model run
    preds = ok.select(list(PREDICTION_COLUMNS) + flags)
    if plan.carried is not None:
        preds = preds.join(plan.carried, keys="slide_id", join_type="left outer")
        preds = _order_table(preds, plan.order)
    failed_rows = list(plan.failed) + [
        {"slide_id": r["slide_id"], "stage": "scoring", "reason": r["error"]} for r in bad.to_pylist()]
    returned = set(results.column("slide_id").to_pylist())
    failed_rows += [{"slide_id": t["slide_id"], "stage": "scoring",
                     "reason": "no result returned (its worker failed; see the Ray logs)"}
                    for t in plan.todo if t["slide_id"] not in returned]
    pos = {sid: i for i, sid in enumerate(plan.order)}
    failed_rows.sort(key=lambda r: pos.get(r["slide_id"], len(pos)))
    failed = pa.Table.from_pylist(failed_rows, schema=pa.schema([(c, pa.string()) for c in FAILED_COLUMNS]))
    return preds, failed


def score_cohort(cfg: ScoreConfig) -> ScoreSummary:
    """Score every slide of a feature store (or the manifest's subset) and write the outputs under ``cfg.out``.

    Outputs: ``predictions.parquet``/``.csv`` (one row per scored slide), ``failed.csv`` (slide_id, stage,
    reason; header only when none failed), ``attention/<slide_id>.parquet`` with ``--attention``, ``run.json``.
    """
    t0 = time.perf_counter()
    identity = ensemble_identity(cfg.model)           # fails fast on a wrong --model, before Ray starts
    calibration, points = load_calibration(cfg.model), load_operating_points(cfg.model)
    identity = {**identity, "calibration": calibration.method, "flag_columns": [op["column"] for op in points]}
    plan = plan_scoring(cfg.features, cfg.manifest)
    storage.makedirs(cfg.out)
    if cfg.attention:
        storage.makedirs(storage.join(cfg.out, ATTENTION_DIR))
    log.info("scoring %d slides (%d not scorable) with run %s (%d folds, sha %s)", len(plan.todo),
             len(plan.failed), identity["run_id"], len(identity["folds"]), identity["sha256"][:12])

    bar = _progress(len(plan.todo), cfg.progress)
    counts = {"failed": 0}
    timing: dict[str, float] = {}

    def on_batch(batch: pa.Table) -> None:
        counts["failed"] += int(pc.sum(pc.not_equal(batch.column("status"), "ok")).as_py() or 0)
        if bar is not None:
            bar.update(batch.num_rows)
            bar.set_postfix(failed=counts["failed"])

    try:
        results = run_ray_scoring(plan.todo, cfg, identity, on_batch=on_batch, timing=timing)
    finally:
        if bar is not None:
            bar.close()
    preds, failed = build_outputs(results, plan)

    storage.write_parquet_atomic(preds, storage.join(cfg.out, PREDICTIONS_PARQUET))
    _write_csv(preds, storage.join(cfg.out, PREDICTIONS_CSV))
    _write_csv(failed, storage.join(cfg.out, FAILED_CSV))
    pred_names = preds.column("pred_score").to_pylist() if preds.num_rows else []
    class_counts = {s: pred_names.count(s) for s in HER2_SCORES}
    summary = ScoreSummary(out=cfg.out, n_requested=len(plan.order), n_scored=preds.num_rows,
                           n_failed=failed.num_rows, seconds=time.perf_counter() - t0,
                           class_counts=class_counts, n_her2_low=class_counts["1+"] + class_counts["2+"],
                           model=identity, timing=timing)
    record = run_record("score", cfg.to_dict(), model=identity, summary=summary.to_dict(),
                        calibration=calibration.to_dict(), operating_points=points,
                        outputs={"predictions": PREDICTIONS_PARQUET, "predictions_csv": PREDICTIONS_CSV,
                                 "failed": FAILED_CSV, "attention": ATTENTION_DIR if cfg.attention else None})
    write_run_record(storage.join(cfg.out, RUN_FILE), record)
    log.info("scored %d/%d slides in %.1f s (%d failed): %s", summary.n_scored, summary.n_requested,
             summary.seconds, summary.n_failed, json.dumps(class_counts))
    return summary


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="scoring slides", unit="slide", file=console.stderr())


__all__ = ["EnsembleScorer", "FAILED_CSV", "PREDICTIONS_CSV", "PREDICTIONS_PARQUET", "PREDICTION_COLUMNS",
           "ScoreConfig", "ScoreSummary", "ScoringPlan", "build_outputs", "plan_scoring", "run_ray_scoring",
           "score_cohort"]
