"""Heatmaps for requested slides or a whole cohort, one Ray task per slide.

Why Ray tasks (not Ray Data): the unit is one slide with one side effect (two files) and a tiny status back;
there is no stream of records to transform. Tasks are submitted with a bounded number in flight so the driver
holds only ids and statuses, whatever the cohort size. ``local=True`` runs the same function in-process (one
slide, debugging, or no Ray available).

Inputs per slide: the slide (local or s3://, opened with ``her2ray.slides.open_slide``, which stages remote
files), its attention file from ``her2ray score --attention`` (``x, y, score`` + tile size in its metadata) and,
optionally, its prediction row for the title. The tile edge in level-0 pixels comes from the attention file's
metadata, else from the feature file's metadata (``--features``).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import Field

from .. import console, resources, storage, watchdog
from ..ray_runtime import ensure_ray
from ..config import StageConfig
from ..errors import ConfigError, FeatureStoreError
from ..features.schema import META_KEY as FEATURE_META_KEY
from ..features.schema import feature_url
from ..labels import PROB_COLUMNS
from ..scoring.engine import ATTENTION_META_KEY
from .geojson import tiles_feature_collection, write_geojson
from .render import PERCEPTUAL_CMAPS, prediction_title, relative_attention, render_heatmap

log = logging.getLogger(__name__)

STATUS_FILE = "heatmaps.csv"
MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


class HeatmapConfig(StageConfig):
    """Rendering settings of ``her2ray heatmap``."""

    out: str
    max_px: int = Field(1024, ge=32, le=8192, description="longer side of the thumbnail panels")
    cmap: str = "viridis"
    alpha: float = Field(0.6, gt=0, le=1)
    normalize: str = Field("minmax", pattern="^(minmax|rank|none)$")
    #: colour scale: per slide (``normalize``) or one range for the cohort (attention / slide mean)
    scale: str = Field("slide", pattern="^(slide|cohort)$")
    #: (lo, hi) of the cohort scale; filled in by ``render_cohort`` from every slide's attention
    cohort_range: tuple[float, float] | None = None
    #: no overlay off tissue (tissue mask of the thumbnail)
    tissue_only: bool = True
    png: bool = True
    geojson: bool = True
    measurement: str = "attention"
    address: str | None = None
    cpus_per_task: float = Field(1.0, gt=0)
    max_in_flight: int = Field(64, ge=1)
    slide_timeout: float = Field(watchdog.DEFAULT_SLIDE_TIMEOUT_S, gt=0,
                                 description="seconds without progress on one slide before it is failed")
    max_worker_crashes: int = Field(watchdog.DEFAULT_MAX_CRASHES, ge=1)


@dataclass
class HeatmapJob:
    """Everything one task needs; small and picklable."""

    slide_id: str
    slide_path: str
    attention_url: str
    prediction: dict[str, Any] | None = None
    tile_size: float | None = None      # level-0 px; None = from the attention/feature file metadata
    feature_url: str | None = None
    mpp: float | None = None
    truth: str | None = None            # HER2 score from the manifest, shown beside the prediction


def read_attention(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """x, y (level-0 px), score and the file's her2ray metadata (tile size...)."""
    try:
        table = storage.read_parquet(url, columns=["x", "y", "score"])
    except FileNotFoundError:
        raise FeatureStoreError(f"{url}: attention file not found (run `her2ray score --attention`)") from None
    meta_raw = (table.schema.metadata or {}).get(ATTENTION_META_KEY)
    meta = json.loads(meta_raw) if meta_raw else {}
    return (table.column("x").to_numpy().astype(np.int64), table.column("y").to_numpy().astype(np.int64),
            table.column("score").to_numpy().astype(np.float64), meta)


def _tile_size(job: HeatmapJob, meta: dict[str, Any]) -> float:
    if job.tile_size:
        return float(job.tile_size)
    if meta.get("tile_size_level0_px"):
        return float(meta["tile_size_level0_px"])
    if job.feature_url:
        raw = storage.read_parquet_metadata(job.feature_url).get(FEATURE_META_KEY)
        if raw:
            return float(json.loads(raw)["tile_size_level0_px"])
    raise FeatureStoreError(f"{job.attention_url}: no tile size in its metadata; pass --features STORE "
                            "or --tile-size")


def render_slide(job: HeatmapJob, cfg: HeatmapConfig) -> dict[str, Any]:
    """Write ``OUT/<slide_id>.png`` and ``OUT/<slide_id>.geojson``; returns a status row, never raises."""
    from ..slides import open_slide

    t0 = time.perf_counter()
    status = {"slide_id": job.slide_id, "status": "failed", "reason": "", "png": "", "geojson": "",
              "n_tiles": 0, "seconds": 0.0}
    try:
        watchdog.beat("reading attention")
        x, y, scores, meta = read_attention(job.attention_url)
        size = _tile_size(job, meta)
        status["n_tiles"] = int(len(x))
        if cfg.geojson:
            url = storage.join(cfg.out, f"{job.slide_id}.geojson")
            fc = tiles_feature_collection(x, y, scores, size, measurement=cfg.measurement, slide_id=job.slide_id)
            write_geojson(url, fc)
            status["geojson"] = url
        if cfg.png:
            watchdog.beat("opening slide")
            with open_slide(job.slide_path, mpp_override=job.mpp) as reader:
                thumb = reader.thumbnail(cfg.max_px)
                dims = reader.dimensions
                slide_mpp = meta.get("slide_mpp") or _reader_mpp(reader)
            shown = relative_attention(scores) if cfg.scale == "cohort" else scores
            png, _ = render_heatmap(thumb, dims, x, y, shown, size,
                                    title=prediction_title(job.slide_id, job.prediction, job.truth), cmap=cfg.cmap,
                                    alpha=cfg.alpha, normalize=cfg.normalize, slide_mpp=slide_mpp,
                                    value_range=cfg.cohort_range if cfg.scale == "cohort" else None,
                                    tissue=_tissue(thumb) if cfg.tissue_only else None,
                                    random_weights=_random_weights(job, meta))
            url = storage.join(cfg.out, f"{job.slide_id}.png")
            storage.write_bytes_atomic(url, png)
            status["png"] = url
        status["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - one slide's problem must not stop the cohort
        log.warning("heatmap of %s failed: %s", job.slide_id, exc)
        status["reason"] = f"{type(exc).__name__}: {exc}"
    status["seconds"] = round(time.perf_counter() - t0, 3)
    return status


def _failed_status(slide_id: str, reason: str) -> dict[str, Any]:
    return {"slide_id": slide_id, "status": "failed", "reason": reason, "png": "", "geojson": "", "n_tiles": 0,
            "seconds": 0.0}


def _render_task(job_dict: dict[str, Any], cfg_dict: dict[str, Any], ledger=None,
                 plugins: str | None = None) -> dict[str, Any]:
    """One slide in a Ray task, under the process watchdog and the run's crash ledger."""
    watchdog.load_plugins(plugins)
    job, cfg = HeatmapJob(**job_dict), HeatmapConfig.from_mapping(cfg_dict)
    guard = watchdog.Guard(ledger, watchdog.GuardConfig(timeout_s=cfg.slide_timeout,
                                                        max_crashes=cfg.max_worker_crashes))
    return guard.run(job.slide_id, job.slide_path, lambda: render_slide(job, cfg),
                     lambda reason: _failed_status(job.slide_id, reason))

def _reader_mpp(reader) -> float | None:
    try:
        return float(reader.mpp)
    except Exception:  # noqa: BLE001 - no MPP: the picture simply has no scale bar
        return None


def _tissue(thumb: np.ndarray) -> np.ndarray | None:
    from ..tiling.mask import tissue_mask

    try:
        return tissue_mask(thumb, fill_holes=False)
    except Exception:  # noqa: BLE001 - no mask: the overlay covers every tile
        return None


def _random_weights(job: HeatmapJob, meta: dict[str, Any]) -> bool:
    """Whether the features came from a random-weight encoder (attention metadata, else the feature file)."""
    if "encoder_random_weights" in meta:
        return bool(meta["encoder_random_weights"])
    if job.feature_url:
        try:
            raw = storage.read_parquet_metadata(job.feature_url).get(FEATURE_META_KEY)
            return bool(json.loads(raw).get("encoder", {}).get("random_weights")) if raw else False
        except Exception:  # noqa: BLE001
            return False
    return False


def cohort_range(jobs: list[HeatmapJob], percentile: float = 99.0) -> tuple[float, float]:
    """(0, p-th percentile) of attention / slide mean over every tile of every slide: one colour scale."""
    values = [relative_attention(read_attention(j.attention_url)[2]) for j in jobs]
    values = [v[np.isfinite(v)] for v in values]
    allv = np.concatenate(values) if values else np.zeros(0)
    hi = float(np.percentile(allv, percentile)) if len(allv) else 1.0
    return 0.0, max(hi, 1.0)


# ------------------------------------------------------------------------------------------------------
# Driver: which slides, from where

def slide_id_from_path(path: str) -> str:
    """``/a/b/CMU-1.svs`` -> ``CMU-1``; ``x.ome.tiff`` -> ``x``."""
    name = posixpath.basename(str(path).rstrip("/"))
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def resolve_slides(slides: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{slide_id: {path, mpp}}`` from one manifest (CSV/Parquet with slide_id, path[, mpp]) or slide paths."""
    slides = [str(s) for s in slides]
    if len(slides) == 1 and slides[0].lower().endswith(MANIFEST_SUFFIXES):
        from ..manifest import load_manifest

        return {r["slide_id"]: {"path": r["path"], "mpp": r.get("mpp"), "truth": r.get("her2_score") or None}
                for r in load_manifest(slides[0])}
    out: dict[str, dict[str, Any]] = {}
    for path in slides:
        sid = slide_id_from_path(path)
        if sid in out:
            raise ConfigError(f"two slides share the id {sid!r}: {out[sid]['path']} and {path}; use a manifest")
        out[sid] = {"path": path, "mpp": None}
    return out


def read_predictions(url: str | None, slide_ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Prediction rows by slide id (Parquet or CSV from `her2ray score`), only the columns a title needs."""
    if not url:
        return {}
    from ..manifest import read_table

    table = read_table(url)
    cols = [c for c in ("slide_id", "pred_score", *PROB_COLUMNS, "fold_std") if c in table.column_names]
    wanted = set(slide_ids) if slide_ids is not None else None
    out = {}
    for row in table.select(cols).to_pylist():
        sid = str(row["slide_id"])
        if wanted is None or sid in wanted:
            out[sid] = row
    return out


def plan_jobs(attention_dir: str, slides: Iterable[str], predictions: str | None = None,
              slide_ids: Iterable[str] | None = None, features: str | None = None,
              tile_size: float | None = None) -> tuple[list[HeatmapJob], list[dict[str, Any]]]:
    """Jobs for the requested slides (default: every slide with both an attention file and a slide path).

    Slides that cannot be rendered come back as failed status rows with the reason.
    """
    paths = resolve_slides(slides)
    files = storage.list_files(attention_dir, suffix=".parquet")
    attention = {posixpath.basename(f)[: -len(".parquet")]: f for f in files}
    if slide_ids:
        ids = list(dict.fromkeys(str(s) for s in slide_ids))
    else:
        ids = sorted(set(attention) & set(paths)) or sorted(set(attention) | set(paths))
    preds = read_predictions(predictions, ids)
    jobs, failed = [], []
    for sid in ids:
        reason = None
        if sid not in attention:
            reason = f"no attention file {storage.join(attention_dir, sid + '.parquet')} (score with --attention)"
        elif sid not in paths:
            reason = "slide path unknown (not in --slides)"
        if reason:
            failed.append(_failed_status(sid, reason))
            continue
        jobs.append(HeatmapJob(slide_id=sid, slide_path=paths[sid]["path"], attention_url=attention[sid],
                               prediction=preds.get(sid), tile_size=tile_size, mpp=paths[sid].get("mpp"),
                               truth=None if paths[sid].get("truth") is None else str(paths[sid]["truth"]),
                               feature_url=feature_url(features, sid) if features else None))
    return jobs, failed


def preflight_jobs(jobs: list[HeatmapJob]) -> tuple[list[HeatmapJob], list[dict[str, Any]]]:
    """Jobs whose slide passes ``her2ray.preflight`` (exists, regular readable file / S3 object), and failed
    status rows for the others, before any Ray task starts."""
    from ..preflight import check_paths

    reasons = check_paths([j.slide_path for j in jobs])
    ok = [j for j in jobs if reasons.get(j.slide_path) is None]
    failed = [{"slide_id": j.slide_id, "status": "failed", "reason": f"preflight: {j.slide_path}: "
               f"{reasons[j.slide_path]}", "png": "", "geojson": "", "n_tiles": 0, "seconds": 0.0}
              for j in jobs if reasons.get(j.slide_path) is not None]
    return ok, failed


def render_cohort(jobs: list[HeatmapJob], cfg: HeatmapConfig, local: bool = False,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Render every job (Ray tasks, or in-process with ``local``); returns status rows in job order."""
    if cfg.cmap not in PERCEPTUAL_CMAPS:
        raise ConfigError(f"colormap {cfg.cmap!r} is not perceptually uniform; use one of {PERCEPTUAL_CMAPS}")
    storage.makedirs(cfg.out)
    if cfg.scale == "cohort" and cfg.cohort_range is None and jobs:
        cfg = cfg.model_copy(update={"cohort_range": cohort_range(jobs)})
        log.info("cohort colour scale: attention / slide mean in [%.2f, %.2f]", *cfg.cohort_range)
    bar = None
    if progress and jobs:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="heatmaps", unit="slide", file=console.stderr())
    results: dict[str, dict[str, Any]] = {}
    try:
        if local:
            for job in jobs:
                results[job.slide_id] = render_slide(job, cfg)
                if bar is not None:
                    bar.update(1)
        else:
            import ray

            ensure_ray(cfg.address, log_to_driver=False)
            resources.check_fits({"CPU": cfg.cpus_per_task}, resources.cluster_shapes(), what="a heatmap task",
                                 hint="Lower cpus_per_task.")
            guard = watchdog.GuardConfig(timeout_s=cfg.slide_timeout, max_crashes=cfg.max_worker_crashes)
            ledger = watchdog.make_ledger()
            # Ray retries a task whose worker or node died; the ledger fails the slide at the crash budget.
            task = ray.remote(num_cpus=cfg.cpus_per_task, max_retries=-1)(_render_task)
            cfg_dict, plugins = cfg.to_dict(), os.environ.get(watchdog.PLUGIN_ENV)
            pending: dict = {}
            queue = list(jobs)
            while queue or pending:
                while queue and len(pending) < cfg.max_in_flight:
                    job = queue.pop(0)
                    pending[task.remote(asdict(job), cfg_dict, ledger, plugins)] = job.slide_id
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    sid = pending.pop(ref)
                    try:
                        status = ray.get(ref)
                    except ray.exceptions.RayError:      # retries exhausted: the ledger says why
                        status = _failed_status(sid, watchdog.missing_reason(
                            sid, watchdog.ledger_report(ledger), guard))
                    results[status["slide_id"]] = status
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [results[j.slide_id] for j in jobs]


def write_status(out: str, rows: list[dict[str, Any]]) -> str:
    url = storage.join(out, STATUS_FILE)
    schema = pa.schema([("slide_id", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                        ("png", pa.string()), ("geojson", pa.string()), ("n_tiles", pa.int64()),
                        ("seconds", pa.float64())])
    sink = pa.BufferOutputStream()
    pacsv.write_csv(pa.Table.from_pylist(rows, schema=schema), sink)
    storage.write_bytes_atomic(url, sink.getvalue().to_pybytes())
    return url


__all__ = ["HeatmapConfig", "HeatmapJob", "cohort_range", "plan_jobs", "preflight_jobs", "read_attention", "read_predictions", "render_cohort",
           "render_slide", "resolve_slides", "slide_id_from_path", "write_status"]
