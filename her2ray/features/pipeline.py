"""Cohort embedding on Ray Data: manifest rows in, one feature file per slide + a catalog out.

Two engines (``engine=``), same outputs, same resume rules, same catalog:

* ``pipelined`` (the default on GPU clusters, ``engine="auto"``; features/stages.py): planning and tile reading run as Ray Data CPU tasks several
  slides ahead, an encoder actor per GPU (or CPU actors) takes fixed-shape batches of tiles from any slide,
  and the driver commits each slide's file when its last tile is encoded (features/assemble.py);
* ``slide`` (the reference engine, kept for formats/debugging and as the benchmark baseline)::

    ray.data.from_items(todo, override_num_blocks=len(todo))                   (one block per slide)
      .map_batches(SlideEmbedActor, batch_size=1, compute=ActorPoolStrategy(size=n),
                   num_gpus=g  | num_cpus=c)                                  (encoder loaded once per actor)
      .iter_rows()  -> small status rows stream back; the driver logs progress

  each actor calls the Ray-free engine ``embed_slide`` (features/embed.py), which writes its slide's file.

``todo`` = manifest rows minus slides already done with the same settings (driver, catalog.plan_resume).
Nothing here changes what a feature is beyond the documented read-path differences (README, "embed").
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from .. import resources, storage, watchdog
from ..heartbeat import RunHeartbeat
from ..preflight import preflight_rows
from ..ray_runtime import ensure_ray
from ..errors import ConfigError
from ..provenance import run_record
from . import catalog
from .lease import StoreLease
from .embed import (STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, EmbedConfig, embed_slide, load_engine_encoder,
                    resume_key, status_row)
from .assemble import NO_RESULT
from .reading import TRANSPORTS
from .schema import FEATURES_DIR, RUN_FILE
from .stages import fail_missing_slides, run_pipelined

log = logging.getLogger(__name__)

#: ``pipelined``: CPU planning/reading tasks -> encoder actors -> driver-side commits; ``slide``: one slide per call;
#: ``auto`` (default): pipelined when the encoder actors get GPUs, slide on CPU-only clusters (there the encoder
#: is the bottleneck anyway; both engines run every slide step under the watchdog)
ENGINES = ("auto", "pipelined", "slide")


class SlideEmbedActor:
    """Ray Data callable class: one encoder per actor, one slide per call (``batch_size=1``)."""

    def __init__(self, cfg: dict[str, Any], out_store: str, storage_options: dict[str, Any] | None = None,
                 torch_threads: int | None = None, guard: dict[str, Any] | None = None, ledger=None,
                 plugins: str | None = None):
        watchdog.load_plugins(plugins)
        if torch_threads:
            import torch

            torch.set_num_threads(max(1, int(torch_threads)))   # no oversubscription next to other actors
        self.cfg = EmbedConfig.from_mapping({**cfg, "storage_options": storage_options})
        self.out_store = out_store
        self.encoder = load_engine_encoder(self.cfg)
        self.guard = watchdog.Guard(ledger, watchdog.GuardConfig(**(guard or {})), storage_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return status_table([self.guard.run(
            r["slide_id"], r["path"], lambda r=r: embed_slide(r, self.encoder, self.cfg, self.out_store),
            lambda reason, r=r: status_row(r, STATUS_FAILED, error=reason)) for r in _batch_rows(batch)])


def _batch_rows(batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    n = len(batch["slide_id"])
    rows = []
    for i in range(n):
        mpp = batch["mpp"][i] if "mpp" in batch else None
        if mpp is not None and not (isinstance(mpp, (float, np.floating)) and np.isfinite(mpp)):
            mpp = None
        rows.append({"slide_id": str(batch["slide_id"][i]), "path": str(batch["path"][i]),
                     "mpp": None if mpp is None else float(mpp)})
    return rows


def _batch_items(todo: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Manifest rows as Ray Data items (slide_id, path, mpp override or None)."""
    return [{"slide_id": r["slide_id"], "path": str(r["path"]),
             "mpp": None if r.get("mpp") in (None, "") else float(r["mpp"])} for r in todo]


def status_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([dict(r) for r in rows], schema=catalog.CATALOG_SCHEMA)


# ----------------------------------------------------------------------------------------------------

@dataclass
class EmbedSummary:
    """What one ``embed_slides`` call did; also written to run.json."""

    out: str
    n_slides: int
    counts: dict[str, int]
    n_tiles_embedded: int
    seconds: float
    failed: list[dict[str, str]] = field(default_factory=list)
    encoder: dict[str, Any] = field(default_factory=dict)
    actors: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    catalog_url: str = ""
    run_url: str = ""
    #: where the wall time went: preflight_s, encoder_load_s (driver), ray_start_s, actor_startup_s (actors
    #: started + encoder loaded until the first slide began), embed_s (first slide began -> last slide done)
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return self.counts.get(STATUS_FAILED, 0)

    @property
    def tiles_per_s(self) -> float:
        """Embedding throughput: tiles over the time slides were being embedded (start-up excluded)."""
        span = self.timing.get("embed_s") or self.seconds
        return self.n_tiles_embedded / span if span > 0 else 0.0

    @property
    def startup_s(self) -> float:
        return sum(self.timing.get(k, 0.0) for k in ("preflight_s", "encoder_load_s", "ray_start_s",
                                                        "actor_startup_s"))

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "n_slides": self.n_slides, "counts": self.counts,
                "n_tiles_embedded": self.n_tiles_embedded, "seconds": round(self.seconds, 3),
                "tiles_per_s": round(self.tiles_per_s, 2), "failed": self.failed, "actors": self.actors,
                "stages": self.stages, "timing": {k: round(v, 3) for k, v in self.timing.items()}}

    def table(self) -> str:
        """Human summary printed at the end of a run."""
        lines = [f"her2ray embed: {self.n_slides} slides -> {self.out}",
                 f"  ok       {self.counts.get(STATUS_OK, 0):6d}",
                 f"  skipped  {self.counts.get(STATUS_SKIPPED, 0):6d}   (already embedded with the same settings)",
                 f"  failed   {self.counts.get(STATUS_FAILED, 0):6d}",
                 f"  tiles embedded {self.n_tiles_embedded} in {self.timing.get('embed_s', self.seconds):.1f} s of "
                 f"embedding ({self.tiles_per_s:.1f} tiles/s)",
                 f"  start-up {self.startup_s:.1f} s (" + ", ".join(
                     f"{label} {self.timing[k]:.1f} s" for k, label in (
                         ("preflight_s", "preflight"), ("encoder_load_s", "encoder check"),
                         ("ray_start_s", "Ray start"), ("actor_startup_s", "actors + model load"))
                     if k in self.timing) + f"); wall {self.seconds:.1f} s",
                 f"  encoder {self.encoder.get('name')} [{self.encoder.get('architecture')}] weights "
                 f"{str(self.encoder.get('weights_sha256'))[:12]}"
                 + ("  ** RANDOM WEIGHTS **" if self.encoder.get("random_weights") else "")]
        for f in self.failed[:20]:
            lines.append(f"  FAILED {f['slide_id']}: {f['error']}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more failures (see {self.catalog_url})")
        return "\n".join(lines)


class _Progress:
    """Driver-side progress: slides done/total, tiles/s, ETA; throttled for big cohorts, failures always."""

    def __init__(self, total: int, enabled: bool = True, every_s: float = 10.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.done = self.tiles = self.failed = 0
        self.t0 = self._last = time.perf_counter()
        self.first_at: float | None = None          # first slide finished: start-up is over
        self.tiles_at_first = 0

    def update(self, row: Mapping[str, Any]) -> None:
        self.done += 1
        self.tiles += int(row.get("n_tiles") or 0) if row.get("status") == STATUS_OK else 0
        if self.first_at is None:
            self.first_at, self.tiles_at_first = time.perf_counter(), self.tiles
        is_failed = row.get("status") == STATUS_FAILED
        self.failed += is_failed
        if not self.enabled:
            return
        now = time.perf_counter()
        if is_failed:
            log.warning("slide %s failed: %s", row.get("slide_id"), row.get("error"))
        if self.total <= 200 or now - self._last >= self.every_s or self.done == self.total or is_failed:
            self._last = now
            elapsed = now - self.t0
            eta = elapsed / self.done * (self.total - self.done)
            if self.first_at is not None and self.done > 1 and now > self.first_at:   # steady state, by tiles
                per_slide = (now - self.first_at) / (self.done - 1)
                eta = per_slide * (self.total - self.done)
            log.info("[%d/%d slides] %s %s (%d tiles, %.1fs) | %.1f tiles/s | %d failed | ETA %s",
                     self.done, self.total, row.get("slide_id"), row.get("status"), int(row.get("n_tiles") or 0),
                     float(row.get("seconds") or 0.0), self.tiles / max(elapsed, 1e-9), self.failed,
                     _fmt_seconds(eta))

    def timing(self) -> dict[str, Any]:
        """Start-up (to the first finished slide) and steady-state tiles/s after it."""
        end = time.perf_counter()
        if self.first_at is None:
            return {"first_slide_s": None, "steady_tiles_per_s": None}
        span = end - self.first_at
        return {"first_slide_s": round(self.first_at - self.t0, 3),
                "steady_tiles_per_s": round((self.tiles - self.tiles_at_first) / span, 2) if span > 0 else None}


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plan_actors(node: Mapping[str, float] | Sequence[resources.NodeShape], n_todo: int, *,
                num_actors: int | None = None, num_gpus_per_actor: float | None = None,
                num_cpus_per_actor: float | None = None) -> dict[str, Any]:
    """Actor count and per-actor resources (``resources.plan_for_nodes``): one actor per GPU (or per fraction)
    on GPU nodes, else CPU actors of ``num_cpus_per_actor`` (default min(4, CPUs of the largest node)).
    ``node``: node shapes, or one resource mapping taken as a single node."""
    shapes = node if not isinstance(node, Mapping) else [resources.NodeShape(
        "node", float(node.get("CPU", 1.0)), float(node.get("GPU", 0.0)))]
    return resources.plan_for_nodes(shapes, n_todo, num_actors=num_actors, num_gpus_per_actor=num_gpus_per_actor,
                                    num_cpus_per_actor=num_cpus_per_actor)


def embed_slides(rows: Sequence[Mapping[str, Any]], out: str, cfg: EmbedConfig, *,
                 lease_ttl_s: float | None = None, **options: Any) -> EmbedSummary:
    """Embed every manifest row not already done into the store ``out`` (local folder or s3:// prefix).

    Holds the store's lease (``features/lease.py``: a second live run on the same store is refused with
    ``StoreBusyError``) for the whole run; see ``_embed_locked`` for the rest.
    """
    storage.makedirs(storage.join(out, FEATURES_DIR))
    kwargs = {} if lease_ttl_s is None else {"ttl_s": float(lease_ttl_s)}
    with StoreLease(out, command="embed", storage_options=cfg.storage_options, **kwargs) as lease:
        catalog.remove_stray_temp_files(out, min_age_s=lease.ttl_s)
        return _embed_locked(rows, out, cfg, lease=lease, **options)


def _embed_locked(rows: Sequence[Mapping[str, Any]], out: str, cfg: EmbedConfig, *, lease: StoreLease,
                  address: str | None = None, num_actors: int | None = None,
                  num_gpus_per_actor: float | None = None, num_cpus_per_actor: float | None = None,
                  overwrite: bool = False, progress: bool = True, manifest: str | None = None,
                  slide_timeout: float | None = None, max_worker_crashes: int | None = None,
                  engine: str = "auto", tile_transport: str = "auto", num_readers: int | None = None,
                  max_inflight_mb: float | None = None) -> EmbedSummary:
    """The run itself, under the store lease (``engine``: see the module docstring).

    Writes ``features/<slide_id>.parquet`` (by the actors), then ``slides.parquet`` and ``run.json``.
    Returns an ``EmbedSummary``; per-slide failures are in it (and in the catalog), never raised.
    """
    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {ENGINES}, got {engine!r}")
    if tile_transport not in TRANSPORTS:
        raise ConfigError(f"--tile-transport must be one of {TRANSPORTS}, got {tile_transport!r}")
    so = cfg.storage_options
    rows = [dict(r) for r in rows]
    # Preflight before the encoder and Ray: missing/unreadable slides fail now, with the reason, not in a worker.
    checked = preflight_rows(rows, so)
    timing = {"preflight_s": checked.seconds}
    preflight_failed = [status_row(r, STATUS_FAILED, error=r["reason"]) for r in checked.failed]
    for f in checked.failed[:20]:
        log.warning("slide %s failed: %s", f["slide_id"], f["reason"])
    if not checked.ok:
        return _all_failed(rows, out, cfg, preflight_failed, manifest, timing, t0)

    # The encoder's identity (weights SHA-256) is part of the resume key; loading it here also fails fast on
    # bad --encoder/--weights before any worker starts.
    t_enc = time.perf_counter()
    identity = load_engine_encoder(cfg.model_copy(update={"device": "cpu", "precision": "fp32"})).identity
    timing["encoder_load_s"] = time.perf_counter() - t_enc
    identity = {k: v for k, v in identity.items() if k not in ("device", "precision")}   # the driver's, not actors'
    settings = {k: identity[k] for k in ("name", "architecture", "weights_sha256", "dim", "random_weights",
                                         "preprocess") if k in identity}
    normalizer = cfg.stain_normalizer()
    key = resume_key(settings, cfg.tiling, None if normalizer is None else normalizer.name)
    plan = catalog.plan_resume(checked.ok, out, key, overwrite=overwrite, storage_options=so)
    if plan.stale:
        log.info("%d slide(s) have feature files made with other settings: recomputing them (e.g. %s)",
                 len(plan.stale), plan.stale[0])
    log.info("embed: %d slides in manifest, %d already done (skipped), %d to embed",
             len(rows), len(plan.skipped), len(plan.todo))
    record = run_record("embed", cfg.to_dict(), encoder=identity, resume_key=key, manifest=manifest,
                        status="running", n_slides=len(rows))
    run_url = storage.join(out, RUN_FILE)
    heart = RunHeartbeat(run_url, {**record, "lease_owner": lease.run_id}, so)

    results: dict[str, dict[str, Any]] = {}
    actors: dict[str, Any] = {}
    stages: dict[str, Any] = {"engine": engine}     # the engine actually used replaces "auto" below
    with heart:
        if plan.todo:
            results, actors, stages = _embed_todo(
                plan.todo, out, cfg, timing, settings, address=address, num_actors=num_actors,
                num_gpus_per_actor=num_gpus_per_actor, num_cpus_per_actor=num_cpus_per_actor, progress=progress,
                slide_timeout=slide_timeout, max_worker_crashes=max_worker_crashes, engine=engine,
                tile_transport=tile_transport, num_readers=num_readers, max_inflight_mb=max_inflight_mb)
    statuses = preflight_failed + list(plan.skipped)
    for r in plan.todo:
        statuses.append(results.get(r["slide_id"]) or status_row(r, STATUS_FAILED, error=NO_RESULT))
    table = catalog.build_catalog(rows, statuses)
    lease.check()                     # never commit the catalog after another run took the store over
    catalog_url = catalog.write_catalog(out, table, so)
    if cfg.qc_dir:
        _contact_sheets(cfg, table)
    counts = {s: 0 for s in (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)}
    for s in statuses:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    summary = EmbedSummary(
        out=out, n_slides=len(rows), counts=counts,
        n_tiles_embedded=sum(int(s["n_tiles"]) for s in statuses if s["status"] == STATUS_OK),
        seconds=time.perf_counter() - t0,
        failed=[{"slide_id": s["slide_id"], "error": str(s["error"])} for s in statuses
                if s["status"] == STATUS_FAILED],
        encoder=identity, actors={k: v for k, v in actors.items() if v is not None}, stages=stages,
        catalog_url=catalog_url, run_url=run_url, timing=timing)
    _write_run(run_url, heart.final(status="finished", summary=summary.to_dict()), so)
    return summary


def _embed_todo(todo: list[dict[str, Any]], out: str, cfg: EmbedConfig, timing: dict[str, float],
                settings: Mapping[str, Any], *, address: str | None, num_actors: int | None,
                num_gpus_per_actor: float | None, num_cpus_per_actor: float | None, progress: bool,
                slide_timeout: float | None, max_worker_crashes: int | None, engine: str, tile_transport: str,
                num_readers: int | None, max_inflight_mb: float | None
                ) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Ray part of a run: size actors per node (fail fast when none fits), run the engine under the watchdog.

    The pipelined engine keeps max(1, CPUs / 4) of each node for its reader tasks when encoders run on CPUs."""
    import ray

    t_ray = time.perf_counter()
    ensure_ray(address, log_to_driver=False)
    timing["ray_start_s"] = time.perf_counter() - t_ray
    shapes = resources.cluster_shapes()
    log.info("Ray nodes: %s", "; ".join(s.describe() for s in shapes))
    if engine == "auto":
        engine = "pipelined" if (num_gpus_per_actor or (num_gpus_per_actor is None and any(s.gpu for s in shapes))
                                 ) else "slide"
    encoder_shapes = shapes
    if engine == "pipelined" and not any(s.gpu for s in shapes) and not num_gpus_per_actor:
        encoder_shapes = [replace(s, cpu=max(1.0, s.cpu - max(1.0, s.cpu // 4))) for s in shapes]
        largest = max(s.cpu for s in encoder_shapes)
        if num_cpus_per_actor and float(num_cpus_per_actor) <= max(s.cpu for s in shapes):
            num_cpus_per_actor = min(float(num_cpus_per_actor), largest)   # (a request no node fits fails below)
    actors = plan_actors(encoder_shapes, len(todo), num_actors=num_actors,
                         num_gpus_per_actor=num_gpus_per_actor, num_cpus_per_actor=num_cpus_per_actor)
    resources.check_fits(resources.actor_request(actors), shapes, what="an embed actor",
                         hint="Lower --num-cpus-per-actor / --num-gpus-per-actor, or add a bigger node.")
    guard = watchdog.GuardConfig(
        timeout_s=watchdog.DEFAULT_SLIDE_TIMEOUT_S if slide_timeout is None else float(slide_timeout),
        max_crashes=watchdog.DEFAULT_MAX_CRASHES if max_worker_crashes is None else int(max_worker_crashes))
    meter = _Progress(len(todo), enabled=progress)
    if engine == "pipelined":
        results, stages = run_pipelined(ray, todo, out, cfg, actors, settings, progress=meter,
                                        transport=tile_transport, num_readers=num_readers,
                                        max_inflight_mb=max_inflight_mb, timing=timing, guard=guard)
    else:
        results = _run_actors(ray, todo, out, cfg, actors, meter, guard, timing)
        stages = {"engine": "slide"}
    stages.update(meter.timing())
    return results, actors, stages


def _contact_sheets(cfg: EmbedConfig, catalog_table: pa.Table) -> None:
    from ..tiling.qc import write_contact_sheets

    sheets = write_contact_sheets(cfg.qc_dir, catalog_table.select(["slide_id", "status", "error", "n_tiles"]).to_pylist(),
                                  storage_options=cfg.storage_options)
    log.info("QC pictures: %d contact sheet(s) in %s", len(sheets), cfg.qc_dir)


def _all_failed(rows, out: str, cfg: EmbedConfig, statuses: list[dict[str, Any]], manifest: str | None,
                timing: dict[str, float], t0: float) -> EmbedSummary:
    """Every row failed preflight: write the catalog and run.json and stop, without loading an encoder or Ray."""
    so = cfg.storage_options
    table = catalog.build_catalog(rows, statuses)
    catalog_url = catalog.write_catalog(out, table, so)
    if cfg.qc_dir:
        _contact_sheets(cfg, table)
    run_url = storage.join(out, RUN_FILE)
    summary = EmbedSummary(
        out=out, n_slides=len(rows), counts={STATUS_OK: 0, STATUS_SKIPPED: 0, STATUS_FAILED: len(statuses)},
        n_tiles_embedded=0, seconds=time.perf_counter() - t0,
        failed=[{"slide_id": s["slide_id"], "error": str(s["error"])} for s in statuses],
        catalog_url=catalog_url, run_url=run_url, timing=timing)
    _write_run(run_url, {**run_record("embed", cfg.to_dict(), manifest=manifest, n_slides=len(rows)),
                         "status": "finished", "summary": summary.to_dict()}, so)
    return summary


def _write_run(url: str, record: dict[str, Any], storage_options: Mapping[str, Any] | None) -> None:
    """run.json (config, versions, encoder identity, summary); never holds storage options/credentials."""
    storage.write_text_atomic(url, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n",
                              storage_options)


def _run_actors(ray, todo: list[dict[str, Any]], out: str, cfg: EmbedConfig, actors: dict[str, Any],
                meter: "_Progress", guard: watchdog.GuardConfig | None = None,
                timing: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Map the engine over ``todo`` on an actor pool; returns status rows by slide id as they stream in."""
    items = _batch_items(todo)
    actor_cfg = cfg.to_dict()
    if actors.get("device"):
        actor_cfg["device"] = cfg.device or actors["device"]
    remote = {"num_gpus": actors["num_gpus"]} if "num_gpus" in actors else {"num_cpus": actors["num_cpus"]}
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.max_errored_blocks, ctx.enable_progress_bars)
    # A slide that kills its worker process (e.g. a native crash in a slide library) must not stop the cohort:
    # its block is dropped and the slide reported as failed by the driver.
    ctx.max_errored_blocks = len(items)
    if meter.enabled:
        ctx.enable_progress_bars = False      # our per-slide lines replace Ray's operator bars
    guard = guard or watchdog.GuardConfig()
    ledger = watchdog.make_ledger()           # attempts/timeouts per slide, shared by the actors
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        with warnings.catch_warnings():       # retry bounds exist only as (deprecated) raw remote args in 2.60
            warnings.simplefilter("ignore")
            statuses = ds.map_batches(
                SlideEmbedActor,
                fn_constructor_kwargs={"cfg": actor_cfg, "out_store": out, "storage_options": cfg.storage_options,
                                       "torch_threads": actors.get("torch_threads"), "guard": guard.to_dict(),
                                       "ledger": ledger, "plugins": os.environ.get(watchdog.PLUGIN_ENV)},
                batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors["num_actors"]),
                **remote, **watchdog.ray_task_options(guard))
        results: dict[str, dict[str, Any]] = {}
        t_start = time.perf_counter()
        work_started = None
        for row in statuses.iter_rows():
            row = dict(row)
            if work_started is None:   # the first slide began this long before its result arrived
                work_started = meter.t0 = time.perf_counter() - float(row.get("seconds") or 0.0)
            results[str(row["slide_id"])] = row
            meter.update(row)
        fail_missing_slides(todo, results, ledger, guard, meter.update)
        if timing is not None and work_started is not None:
            timing["actor_startup_s"] = max(0.0, work_started - t_start)
            timing["embed_s"] = time.perf_counter() - work_started
        return results
    finally:
        ctx.max_errored_blocks, ctx.enable_progress_bars = saved
