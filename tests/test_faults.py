"""Fault drills (issue 15): crashing and hanging slides, no-node-fits requests, each ending in seconds.

Real components only: a real local Ray (the session's), real worker processes that really die (SIGSEGV,
SIGKILL) or really hang, real OpenSlide on synthetic pyramidal TIFFs. The crashing/hanging slide backend is
``her2ray.drills``, loaded into the workers through ``HER2RAY_WORKER_PLUGINS``.
"""

from __future__ import annotations

import os
import shutil
import time

import pyarrow.parquet as pq
import pytest

from her2ray import resources, watchdog
from her2ray.features.embed import EmbedConfig

#: the crash/hang drill runs with both embed engines (``auto`` picks one of them per cluster); the kill -9 drill
#: (lease take-over, skip on rerun: engine-independent) runs the pipelined engine, whose slide files are
#: committed by the driver that gets killed (kept to one engine: the test-time budget)
ENGINES = ("slide", "pipelined")

TINY_CFG = {"embed_dim": 16, "quick_gelu": True,
            "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}}


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    import torch
    from open_clip.model import _build_vision_tower

    from her2ray.encoders import write_open_clip_dir

    torch.manual_seed(7)
    tower = _build_vision_tower(TINY_CFG["embed_dim"], TINY_CFG["vision_cfg"], quick_gelu=True)
    return write_open_clip_dir(tower.state_dict(), TINY_CFG, str(tmp_path_factory.mktemp("tiny_enc")))


@pytest.fixture(scope="module")
def drill_slides(tmp_path_factory) -> dict[str, str]:
    """One good slide and copies of it whose names trigger the drill backend."""
    from her2ray.synth import write_synthetic_slide

    d = tmp_path_factory.mktemp("drill_slides")
    good = write_synthetic_slide(str(d / "good.tiff"), 1024, 768, seed=1)
    paths = {"good": good}
    for sid, name in (("segv", "a__segv__.tiff"), ("once", "b__crash_once__.tiff"), ("hang", "c__hang__.tiff"),
                      ("hang_read", "d__hang_read__.tiff")):
        shutil.copy(good, d / name)
        paths[sid] = str(d / name)
    return paths


@pytest.mark.parametrize("engine", ENGINES)
def test_crashing_and_hanging_slides_fail_alone_and_the_cohort_goes_on(ray_session, tmp_path, drill_slides,
                                                                       tiny_encoder, monkeypatch, engine):
    from her2ray.features.pipeline import embed_slides

    monkeypatch.setenv(watchdog.PLUGIN_ENV, "her2ray.drills")
    open(drill_slides["once"] + ".crash-once", "w").close()
    rows = [{"slide_id": sid, "path": p} for sid, p in drill_slides.items()]     # hang_read: planned, then stuck
    out = str(tmp_path / "store")
    t0 = time.perf_counter()
    summary = embed_slides(rows, out, EmbedConfig(encoder="open_clip", weights=tiny_encoder), num_cpus_per_actor=1,
                           progress=False, slide_timeout=4, max_worker_crashes=2, engine=engine)
    seconds = time.perf_counter() - t0
    errors = {f["slide_id"]: f["error"] for f in summary.failed}
    assert errors == {"segv": "worker crashed 2 times on this slide",
                      "hang": "timed out after 4 s while opening slide",
                      "hang_read": "timed out after 4 s while reading tiles"}     # the read units are watched too
    assert summary.counts["ok"] == 2
    assert not os.path.exists(drill_slides["once"] + ".crash-once")          # it really crashed once
    good = pq.read_table(os.path.join(out, "features", "good.parquet"))
    once = pq.read_table(os.path.join(out, "features", "once.parquet"))
    assert once.num_rows == good.num_rows > 0                                  # retried and embedded exactly once
    assert sorted(os.listdir(os.path.join(out, "features"))) == ["good.parquet", "once.parquet"]
    cat = pq.read_table(os.path.join(out, "slides.parquet")).to_pylist()
    assert {r["slide_id"]: r["status"] for r in cat} == {"good": "ok", "segv": "failed", "once": "ok",
                                                          "hang": "failed", "hang_read": "failed"}
    assert seconds < 300, seconds          # bounded (it used to hang forever); generous for a loaded CI box


def test_request_no_node_can_host_fails_in_seconds(ray_session, tmp_path, drill_slides, tiny_encoder):
    from her2ray.features.pipeline import embed_slides

    t0 = time.perf_counter()
    with pytest.raises(resources.ResourceFitError, match=r"embed actor asks for CPU=3 .*node .*CPU=2"):
        embed_slides([{"slide_id": "good", "path": drill_slides["good"]}], str(tmp_path / "s"),
                     EmbedConfig(encoder="open_clip", weights=tiny_encoder), num_cpus_per_actor=3, progress=False)
    assert time.perf_counter() - t0 < 15


def test_sizing_uses_the_largest_node_not_the_cluster_total():
    two_small = [resources.NodeShape("n1", 1, 0), resources.NodeShape("n2", 1, 0)]
    plan = resources.plan_for_nodes(two_small, n_todo=12)
    assert plan["num_cpus"] == 1.0 and plan["num_actors"] == 2                # not 2-CPU actors
    with pytest.raises(resources.ResourceFitError, match="CPU=2"):
        resources.check_fits({"CPU": 2}, two_small, what="x", hint="")
    mixed = [resources.NodeShape("cpu", 32, 0), resources.NodeShape("gpu", 8, 2)]
    gpu = resources.plan_for_nodes(mixed, n_todo=10)
    assert gpu["num_gpus"] == 1.0 and gpu["num_actors"] == 2
    # a node type the autoscaler can add counts as a place the request can go
    resources.check_fits({"GPU": 4}, mixed + [resources.NodeShape("p4", 96, 8, can_add=True)], what="x", hint="")
    with pytest.raises(resources.ResourceFitError, match="GPU=4"):
        resources.check_fits({"GPU": 4}, mixed, what="x", hint="")


@pytest.mark.parametrize("engine", ["pipelined"])
def test_kill_9_of_the_embed_driver_then_rerun_embeds_every_slide_exactly_once(ray_session, tmp_path, drill_slides,
                                                                                tiny_encoder, engine):
    """The driver dies mid-run (kill -9) while one slide is still in flight: its lease and run.json stay behind;
    the rerun takes the lease over at once, keeps the finished slide and embeds the rest once."""
    import json
    import signal
    import subprocess
    import sys

    import pandas as pd

    from her2ray.features.pipeline import embed_slides
    from her2ray.heartbeat import liveness

    manifest = tmp_path / "m.csv"
    pd.DataFrame([{"slide_id": "good", "path": drill_slides["good"]},
                  {"slide_id": "slow", "path": drill_slides["hang"]}]).to_csv(manifest, index=False)
    out = tmp_path / "store"
    env = {**os.environ, watchdog.PLUGIN_ENV: "her2ray.drills",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")])}
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from her2ray.cli import main; sys.exit(main())",
                             "embed", "--manifest", str(manifest), "--out", str(out), "--encoder", "open_clip",
                             "--weights", tiny_encoder, "--address", address, "--num-cpus-per-actor", "1",
                             "--no-progress", "--engine", engine], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "driver.err", "wb"))
    try:
        deadline = time.time() + 120
        while not (out / "features" / "good.parquet").exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "driver.err").read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lease = json.loads((out / "_lease.json").read_text())
    assert lease["pid"] == proc.pid                                   # left behind by the dead driver
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert not (out / "slides.parquet").exists()
    good_rows = pq.read_table(out / "features" / "good.parquet").num_rows

    summary = embed_slides([{"slide_id": "good", "path": drill_slides["good"]},
                            {"slide_id": "slow", "path": drill_slides["hang"]}], str(out),
                           EmbedConfig(encoder="open_clip", weights=tiny_encoder), num_cpus_per_actor=1,
                           progress=False, engine=engine)
    assert summary.counts == {"ok": 1, "skipped": 1, "failed": 0}
    assert sorted(os.listdir(out / "features")) == ["good.parquet", "slow.parquet"]   # no temp files, no doubles
    assert pq.read_table(out / "features" / "slow.parquet").num_rows == good_rows     # same pixels, same tiles
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and liveness(run) == "finished" and run["pid"] == os.getpid()
    assert not (out / "_lease.json").exists()


def test_read_units_are_watched_while_producing_chunks_not_while_the_consumer_holds_them():
    """``Guard.iterate`` (the pipelined engine's reader tasks): the timeout runs while a chunk is produced, and
    stops while the generator is suspended (a slow encoder downstream must not get a healthy reader killed)."""
    exits: list[int] = []
    guard = watchdog.Guard(None, watchdog.GuardConfig(timeout_s=0.6, seconds_per_gib=0))
    guard.watchdog = watchdog.Watchdog(poll_s=0.05, exit_process=exits.append)

    def chunks(stall_s):
        yield "a"
        time.sleep(stall_s)
        yield "b"

    got = []
    for item in guard.iterate("s#read@0", None, chunks(0.0), lambda reason: reason):
        got.append(item)
        time.sleep(1.2)                                   # the consumer holds the reader 2x the timeout
    assert got == ["a", "b"] and exits == []
    seen: list[tuple[str, str]] = []
    guard._record_timeout = lambda key, reason: seen.append((key, reason))
    list(guard.iterate("s#read@0", None, chunks(1.2), lambda reason: reason))      # stuck producing "b"
    assert exits == [watchdog.WATCHDOG_EXIT_CODE] and seen == [("s#read@0", "timed out after 1 s while reading tiles")]
