"""The pipelined engine on Ray Data: thin wrappers around ``reading``, ``fast_engine`` and ``assemble``.

Shape (rows = slides, then read units, then chunks of tiles; the encoder returns a row per tile)::

    from_items(slides)                                                    one block per slide
      .map_batches(plan_units,  TaskPool(p), num_cpus=1)   open, thumbnail, tissue mask, grid -> read units
      .map_batches(read_tiles,  TaskPool(r), num_cpus=1)   units -> chunks of one forward's tiles, one row each
      .map_batches(EncodeActor, ActorPool(n, 4 blocks in flight, 2 concurrent calls, threads),
                   whole blocks, num_gpus=1 | num_cpus=c)   chunks -> full fixed-shape forwards -> float16 features
      .iter_batches()  -> driver: SlideAssembler commits each slide's file when its last tile is in

Planning and reading are CPU tasks placed wherever the cluster has CPUs, several slides ahead of the encoder;
how far ahead is bounded by Ray Data's streaming backpressure (object store budget, optionally capped with
``max_inflight_mb``) and by the reader pool size. Only compressed tiles (or pixels, for slides the JPEG path
cannot serve; DCT-scaled tiles already at tile size) cross the object store; only 2-byte features come back
to the driver.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Any, Iterator, Mapping

import numpy as np

from .embed import STATUS_FAILED, EmbedConfig, load_engine_encoder, status_row
from .reading import ReadUnit, error_chunk, pack_chunk, plan_slide, read_unit, unit_row

log = logging.getLogger(__name__)


def _rows(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    from .pipeline import _batch_rows

    return _batch_rows(batch)


def plan_units(batch: dict[str, np.ndarray], cfg: dict[str, Any], storage_options: dict | None,
               transport: str, device_type: str, unit_tiles: int, guard: dict | None = None, ledger=None,
               plugins: str | None = None) -> dict[str, list]:
    """Ray Data UDF: slides -> read units (pickled ``ReadUnit``). Opening and planning run under issue 15's
    per-slide watchdog (``guard``/``ledger``): a slide that hangs or keeps crashing its worker becomes one
    failed unit (``timed out after N s while ...`` / ``worker crashed N times on this slide``)."""
    from .. import watchdog

    watchdog.load_plugins(plugins)
    config = EmbedConfig.from_mapping({**cfg, "storage_options": storage_options})
    keeper = watchdog.Guard(ledger, watchdog.GuardConfig(**guard), storage_options) if guard else None
    units = []
    for r in _rows(batch):
        def work(r=r):
            return {"units": plan_slide(r, config, transport=transport, device_type=device_type,
                                         unit_tiles=unit_tiles)}

        def failed(reason, r=r):
            return {"units": [ReadUnit(row=unit_row(r), n_tiles=0, error=reason)]}

        units += (keeper.run(r["slide_id"], r["path"], work, failed) if keeper else work())["units"]
    return {"slide_id": [u.row["slide_id"] for u in units], "unit": [u.to_bytes() for u in units]}


def read_tiles_udf(batch: dict[str, np.ndarray], cfg: dict[str, Any], storage_options: dict | None,
                   chunk_tiles: int, guard: dict | None = None, ledger=None,
                   plugins: str | None = None) -> Iterator[dict[str, Any]]:
    """Ray Data UDF (generator): read units -> chunks of tile payloads, one row per chunk (``pack_chunk``: Ray
    Data then never splits a chunk across encoder calls, so forwards are full). Each chunk is read under issue
    15's watchdog and crash ledger (``guard``/``ledger``, keyed per read unit): a unit whose reading hangs or keeps
    crashing its worker ends as one error row (``timed out after N s while reading tiles`` / ``worker crashed N
    times on this slide``), which fails its slide."""
    from .. import watchdog

    watchdog.load_plugins(plugins)
    config = EmbedConfig.from_mapping({**cfg, "storage_options": storage_options})
    keeper = watchdog.Guard(ledger, watchdog.GuardConfig(**guard), storage_options) if guard else None
    for raw in batch["unit"]:
        unit = ReadUnit.from_bytes(raw)
        chunks = read_unit(unit, config, chunk_tiles=chunk_tiles)
        if keeper is not None and unit.error is None:
            sid = unit.row["slide_id"]
            chunks = keeper.iterate(f"{sid}#read@{unit.start}", unit.row["path"], chunks,
                                    lambda reason, sid=sid: error_chunk(sid, reason))
        for cols in chunks:
            yield pack_chunk(cols)


class EncodeActor:
    """Ray Data callable class: one encoder + encode loop per actor; batches of tiles from any slides."""

    def __init__(self, cfg: dict[str, Any], storage_options: dict | None = None, torch_threads: int | None = None,
                 forward_rows: int | None = None, depth: int = 2):
        from ..encoders.device_loop import EncodeLoop

        if torch_threads:
            import torch

            torch.set_num_threads(max(1, int(torch_threads)))
        self.cfg = EmbedConfig.from_mapping({**cfg, "storage_options": storage_options})
        self.loop = EncodeLoop(load_engine_encoder(self.cfg), rows=forward_rows, depth=depth)
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from .fast_engine import encode_chunks
        from .reading import unpack_chunks

        out = encode_chunks(self.loop, unpack_chunks(batch), self.cfg.tiling.tile_px)
        out = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in out.items()}
        n = len(out["kind"])
        out["actor"] = [self.actor_id] * n
        out["loop_stats"] = [json.dumps(self.loop.stats.to_dict())] + [""] * (n - 1)
        return out


def provenance_of(cfg: EmbedConfig, device: str, forward_rows: int, torch_threads: int | None = None
                  ) -> dict[str, Any]:
    """What the driver's assembler records per file about the actors' encoder (device, precision, decoder)."""
    import torch

    from ..encoders.tile_encoder import default_precision
    from .fast_engine import provenance

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    prov = provenance(cfg.precision or default_precision(torch.device(device_type)), device_type, forward_rows)
    return {**prov, "torch_threads": torch_threads if device_type == "cpu" else None}


def fail_missing_slides(todo, results: dict[str, dict[str, Any]], ledger, guard, update) -> None:
    """Give every slide of ``todo`` that returned no row a failed row saying why (crash budget spent, timed out,
    no result): blocks Ray dropped after the retry bound must not vanish from the catalog."""
    from .. import watchdog

    missing = [r for r in todo if r["slide_id"] not in results]
    if not missing:
        return
    report = watchdog.ledger_report(ledger)
    for r in missing:
        results[r["slide_id"]] = status_row(r, STATUS_FAILED,
                                            error=watchdog.missing_reason(r["slide_id"], report, guard))
        update(results[r["slide_id"]])


def run_pipelined(ray, todo: list[dict[str, Any]], out: str, cfg: EmbedConfig, actors: dict[str, Any],
                  encoder_settings: Mapping[str, Any], *, progress, transport: str = "auto",
                  num_readers: int | None = None, max_inflight_mb: float | None = None,
                  unit_tiles: int = 4096, timing: dict[str, float] | None = None, guard=None
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Run the pipelined engine over ``todo``; (status rows by slide id, stage statistics).

    ``timing`` (the run summary's) gets ``actor_startup_s`` (start -> first encoded tiles back) and ``embed_s``
    (first encoded tiles -> last slide committed)."""
    from .assemble import SlideAssembler
    from .pipeline import _batch_items

    device = "cuda" if actors.get("num_gpus") else (cfg.device or "cpu")
    device_type = "cuda" if device.startswith("cuda") else "cpu"     # "auto" transport: see transport_preference
    forward_rows = int(cfg.batch_size or (1024 if device.startswith("cuda") else 64))
    unit_tiles = max(1, int(unit_tiles) // forward_rows) * forward_rows     # only a slide's last forward is short
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    readers = int(num_readers or max(1, int(cpus - actors.get("num_cpus", 1.0) * actors["num_actors"])))
    # >= 2 planners, and half a logical CPU per planning/reading task: a slide that hangs while it is opened
    # (until the watchdog ends it) must not keep the other slides from being planned and read
    planners = max(2, readers // 2)
    actor_cfg = cfg.to_dict()
    if actors.get("device"):
        actor_cfg["device"] = cfg.device or actors["device"]
    remote = {"num_gpus": actors["num_gpus"]} if "num_gpus" in actors else {"num_cpus": actors["num_cpus"]}
    so = cfg.storage_options
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.max_errored_blocks, ctx.enable_progress_bars, ctx.execution_options.resource_limits)
    ctx.max_errored_blocks = 10 ** 9          # a crashed reader/encoder fails its slides, not the cohort
    ctx.enable_progress_bars = False
    if max_inflight_mb:
        ctx.execution_options.resource_limits = ray.data.ExecutionResources(
            object_store_memory=float(max_inflight_mb) * 1024**2)
    from .. import watchdog

    guard = guard or watchdog.GuardConfig()
    ledger = watchdog.make_ledger()           # attempts/timeouts per slide, shared by the planning tasks
    plugins = os.environ.get(watchdog.PLUGIN_ENV)
    retries = {"max_retries": int(guard.max_crashes) + 1}
    stats: dict[str, Any] = {"engine": "pipelined", "readers": readers, "planners": planners,
                             "forward_rows": forward_rows, "transport": transport}
    assembler = SlideAssembler(todo, out, cfg, encoder_settings, provenance_of(cfg, device, forward_rows,
                                                                                 actors.get("torch_threads")))
    results: dict[str, dict[str, Any]] = {}
    loop_stats: dict[str, dict] = {}
    t0 = time.perf_counter()
    first = None
    try:
        items = _batch_items(todo)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        with warnings.catch_warnings():       # retry bounds exist only as (deprecated) raw remote args in 2.60
            warnings.simplefilter("ignore")
            units = ds.map_batches(plan_units, fn_kwargs={"cfg": cfg.to_dict(), "storage_options": so,
                                                          "transport": transport, "device_type": device_type,
                                                          "unit_tiles": unit_tiles,
                                                          "guard": guard.to_dict(), "ledger": ledger,
                                                          "plugins": plugins},
                                   batch_size=1, batch_format="numpy", num_cpus=0.5,
                                   compute=ray.data.TaskPoolStrategy(size=planners), **retries)
            tiles = units.map_batches(read_tiles_udf, fn_kwargs={"cfg": cfg.to_dict(), "storage_options": so,
                                                                 "chunk_tiles": forward_rows,
                                                                 "guard": guard.to_dict(), "ledger": ledger,
                                                                 "plugins": plugins},
                                      batch_size=1, batch_format="numpy", num_cpus=0.5,
                                      compute=ray.data.TaskPoolStrategy(size=readers + (readers == planners)),
                                      **retries)
        feats = tiles.map_batches(
            EncodeActor, fn_constructor_kwargs={"cfg": actor_cfg, "storage_options": so,
                                                "torch_threads": actors.get("torch_threads"),
                                                "forward_rows": forward_rows},
            # whole reader blocks per call, never re-bundled to ``forward_rows``: Ray Data's bundler holds rows
            # back until a full batch is queued or ALL upstream work is done, so the last tiles of a slide
            # waited for other slides' tiles, and behind a hanging slide (until its watchdog timeout) they
            # waited with it: finished slides were not committed (the kill -9 drill's root cause). Each row
            # is one reader chunk of ``forward_rows`` tiles, encoded as its own fixed-shape forward(s): only a
            # read unit's last chunk is padded.
            batch_size=None, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors["num_actors"], max_tasks_in_flight_per_actor=4,
                                               max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
            **remote, **watchdog.ray_task_options(guard))
        # prefetch_batches=0: with any prefetch, Ray Data's iterator hands out a block only once the NEXT one
        # has arrived (or the stream ended), so the last encoded tiles (of the only slide not stuck
        # behind a hanging one, say) were never committed while anything upstream was still running
        for batch in feats.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            first = first or time.perf_counter()
            for a, s in zip(batch["actor"], batch["loop_stats"]):
                if s:
                    loop_stats[str(a)] = json.loads(s)
            assembler.add(batch)
            for row in assembler.poll():
                results[row["slide_id"]] = row
                progress.update(row)
        for row in assembler.finish():
            results[row["slide_id"]] = row
            progress.update(row)
        fail_missing_slides(todo, results, ledger, guard, progress.update)
    finally:
        ctx.max_errored_blocks, ctx.enable_progress_bars, ctx.execution_options.resource_limits = saved
    end = time.perf_counter()
    if timing is not None and first is not None:
        timing["actor_startup_s"] = first - t0
        timing["embed_s"] = end - first
    rows_ok = [r for r in results.values() if r["status"] == "ok"]
    stats.update({
        "seconds": round(end - t0, 3), "first_output_s": None if first is None else round(first - t0, 3),
        "tiles": assembler.stats.tiles, "write_s": round(assembler.stats.write_s, 3),
        "plan_read_s": round(sum(r["read_wait_s"] for r in rows_ok), 3),
        "encode_s": round(sum(r["encode_s"] for r in rows_ok), 3),
        "encoder_loops": loop_stats})
    busy = sum(s.get("busy_s", 0.0) for s in loop_stats.values())
    idle = sum(s.get("idle_s", 0.0) for s in loop_stats.values())
    stats["device_idle_share"] = round(idle / (busy + idle), 4) if busy + idle > 0 else None
    return results, stats
