"""Robustness without Ray (issue 15): store lease (local + S3), catalog merge, temp files, S3 faults through a
real fault-injecting proxy, manifest defects, umask, heartbeats, fold counts, exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from her2ray import storage
from her2ray.errors import ConfigError, ManifestError, StoreBusyError
from her2ray.features import catalog
from her2ray.features.lease import LEASE_FILE, StoreLease, is_stale
from her2ray.heartbeat import RunHeartbeat, liveness

sys.path.insert(0, os.path.dirname(__file__))
from faultproxy import FaultProxy  # noqa: E402


# ------------------------------------------------------------------------------------------- lease
@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_run_is_refused_while_the_first_is_alive_and_a_stale_lease_is_taken_over(where, tmp_path, request):
    store = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_bucket") + "/store"
    first = StoreLease(store, ttl_s=60).acquire()
    with pytest.raises(StoreBusyError, match=r"in use by another `her2ray embed` run .*host .*pid"):
        StoreLease(store, ttl_s=60).acquire()
    url = storage.join(store, LEASE_FILE)
    record = json.loads(storage.read_text(url))
    assert {"owner", "host", "pid", "started_utc", "heartbeat_unix", "ttl_s"} <= set(record)
    assert record["owner"] == first.run_id
    first.renew()                                     # a live holder keeps it
    # the holder is killed on another host: its last heartbeat ages past the ttl
    record = json.loads(storage.read_text(url))
    storage.write_text_atomic(url, json.dumps({**record, "host": "elsewhere", "heartbeat_unix": time.time() - 61}))
    second = StoreLease(store, ttl_s=60).acquire()
    assert json.loads(storage.read_text(url))["owner"] == second.run_id
    first.renew()                                     # the old holder finds out it lost the store
    assert first.lost and second.run_id in first.lost
    with pytest.raises(StoreBusyError, match="taken over"):
        first.check()
    first.release()                                   # must not delete the new holder's lease
    assert storage.exists(storage.join(store, LEASE_FILE))
    second.release()
    assert not storage.exists(storage.join(store, LEASE_FILE))


def test_lease_of_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"host": socket.gethostname(), "pid": int(proc.stdout), "heartbeat_unix": time.time(), "ttl_s": 600}
    assert "is gone" in is_stale(dead)
    assert is_stale({**dead, "pid": os.getpid()}) is None
    assert "no heartbeat" in is_stale({**dead, "host": "elsewhere", "heartbeat_unix": time.time() - 700})


def test_embed_cli_refuses_a_busy_store_with_exit_code_4_before_any_work(tmp_path, capsys):
    from her2ray.cli import main

    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\na,/nonexistent.svs\n")
    with StoreLease(str(tmp_path / "store")):
        rc = main(["embed", "--manifest", str(manifest), "--out", str(tmp_path / "store")])
    assert rc == 4
    assert "in use by another" in capsys.readouterr().err
    assert not (tmp_path / "store" / "slides.parquet").exists()


# ------------------------------------------------------------------------------------------- catalog + temp files
def test_catalog_keeps_slides_of_other_runs_and_temp_cleanup_spares_fresh_files(tmp_path):
    store = str(tmp_path / "store")
    first = catalog.build_catalog([{"slide_id": f"s{i}", "path": f"/p{i}", "site": "A"} for i in range(6)],
                                  [_status(f"s{i}") for i in range(6)])
    catalog.write_catalog(store, first)
    second = catalog.build_catalog([{"slide_id": f"s{i}", "path": f"/p{i}", "site": 7} for i in range(6, 12)],
                                   [_status(f"s{i}") for i in range(6, 12)])
    catalog.write_catalog(store, second)
    table = pq.read_table(os.path.join(store, "slides.parquet"))
    assert table.column("slide_id").to_pylist() == [f"s{i}" for i in range(6, 12)] + [f"s{i}" for i in range(6)]
    # a rerun of part of the first manifest replaces those rows, keeps the rest
    catalog.write_catalog(store, catalog.build_catalog([{"slide_id": "s0", "path": "/p0"}], [_status("s0")]))
    assert sorted(pq.read_table(os.path.join(store, "slides.parquet")).column("slide_id").to_pylist()) == \
        sorted(f"s{i}" for i in range(12))
    folder = os.path.join(store, "features")
    os.makedirs(folder)
    old, fresh = os.path.join(folder, ".a.parquet.x1.tmp"), os.path.join(folder, ".b.parquet.x2.tmp")
    for p in (old, fresh):
        open(p, "wb").close()
    os.utime(old, (time.time() - 1000, time.time() - 1000))
    assert catalog.remove_stray_temp_files(store, min_age_s=120) == 1
    assert not os.path.exists(old) and os.path.exists(fresh)


def _status(sid):
    return {"slide_id": sid, "path": "", "status": "ok", "error": None, "n_tiles": 3, "mpp": 0.5, "level": 0,
            "seconds": 1.0, "read_wait_s": 0.0, "encode_s": 0.0}


# ------------------------------------------------------------------------------------------- S3 faults
def test_s3_5xx_bursts_and_slow_answers_are_retried_without_duplicates(s3_bucket, s3_server):
    with FaultProxy(s3_server, fail_every=3, burst=1, delay_s=0.5, delay_every=4) as proxy:
        so = {"endpoint_url": proxy.url, "skip_instance_cache": True}
        store = s3_bucket + "/faulty"
        with StoreLease(store, storage_options=so, ttl_s=30):
            for i in range(3):
                t = pa.table({"x": np.arange(100 * (i + 1))})
                storage.write_parquet_atomic(t, storage.join(store, "features", f"s{i}.parquet"), so)
            files = storage.list_files(storage.join(store, "features"), ".parquet", so)
            rows = [storage.read_parquet(f, storage_options=so).num_rows for f in files]
        puts = [p for m, p in proxy.forwarded if m == "PUT" and "/features/" in p]
    assert proxy.injected >= 2 and proxy.delayed >= 1                      # faults really happened
    assert sorted(rows) == [100 * (i + 1) for i in range(3)]               # every object complete, once
    assert len(puts) == len(set(puts)) == 3                                # each write applied exactly once
    assert not storage.exists(storage.join(store, LEASE_FILE))


# ------------------------------------------------------------------------------------------- small defects
def test_manifest_defects_name_the_row(tmp_path):
    from her2ray.manifest import load_manifest

    header = tmp_path / "h.csv"
    header.write_text("slide_id,path\n")
    with pytest.raises(ManifestError, match="header .* but no rows"):
        load_manifest(str(header))
    latin = tmp_path / "l.csv"
    latin.write_bytes("slide_id,path\na,/a.svs\nb,/caf\u00e9.svs\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"row 2: not UTF-8"):
        load_manifest(str(latin))
    long_id = tmp_path / "long.csv"
    long_id.write_text("slide_id,path\nok,/a.svs\n" + "x" * 245 + ",/b.svs\n")
    with pytest.raises(ManifestError, match=r"row 2, column 'slide_id': slide id is 245 bytes"):
        load_manifest(str(long_id))


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        storage.write_text_atomic(str(tmp_path / "a.json"), "{}")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o640
    old = os.umask(0o002)
    try:
        storage.write_parquet_atomic(pa.table({"x": [1]}), str(tmp_path / "b.parquet"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "b.parquet").st_mode & 0o777 == 0o664


def test_run_json_heartbeat_tells_a_dead_run_from_a_live_one(tmp_path):
    url = str(tmp_path / "run.json")
    with RunHeartbeat(url, {"stage": "embed", "status": "running"}, interval_s=1.0) as heart:
        time.sleep(1.3)
        rec = json.loads(open(url).read())
        assert liveness(rec) == "running" and rec["pid"] == os.getpid() and rec["started_utc"]
    # no more beats (the run was killed): stale after STALE_AFTER intervals
    assert rec["heartbeat_utc"] and liveness(rec, now=time.time() + 10) == "stale"
    assert liveness(heart.final(status="finished")) == "finished"


def test_too_few_patients_per_class_is_a_clear_error_before_ray():
    from her2ray.training.fold_check import check_fold_counts

    rows = [{"slide_id": f"s{i}", "patient_id": f"p{i}", "label": lab}
            for i, lab in enumerate([0] * 6 + [1] * 5 + [2] * 3 + [3] * 6)]
    with pytest.raises(ConfigError, match=r"\{0: 6, 1\+: 5, 2\+: 3, 3\+: 6\}; too few for 2\+.*--folds 3"):
        check_fold_counts(rows, 5)
    check_fold_counts(rows, 3)
    check_fold_counts(rows, 5, split_by="center")


def test_ray_that_cannot_start_has_its_own_exit_code_and_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                      # closed again: nothing listens there
    code = ("import sys\nfrom her2ray.ray_runtime import ensure_ray\nfrom her2ray.errors import Her2RayError\n"
            f"try:\n    ensure_ray('127.0.0.1:{port}')\nexcept Her2RayError as e:\n"
            "    print(e); sys.exit(e.exit_code)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"could not connect to the Ray cluster at 127.0.0.1:{port}" in proc.stdout
    assert time.perf_counter() - t0 < 60          # not the minutes ray.init spends waiting for a GCS


def test_watchdog_names_the_stage_and_recycles_the_process_only_without_progress():
    from her2ray.watchdog import Watchdog, beat

    calls, exits = [], []
    dog = Watchdog(poll_s=0.05, exit_process=exits.append)
    with dog.watch("s1", 1.0, lambda sid, reason: calls.append((sid, reason))):
        for _ in range(6):                       # 1.5 s of work, but progress every 0.25 s: no timeout
            time.sleep(0.25)
            beat("reading and encoding tiles")
        assert calls == [] and exits == []
        beat("writing the feature file")
        time.sleep(1.6)                          # then nothing for longer than the timeout
    assert calls == [("s1", "timed out after 1 s while writing the feature file")] and exits == [75]


def test_fifo_slide_fails_at_preflight_in_seconds(tmp_path):
    from her2ray.cli import main

    fifo = tmp_path / "stalled.svs"
    os.mkfifo(fifo)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\nfifo,{fifo}\n")
    t0 = time.perf_counter()
    rc = main(["embed", "--manifest", str(manifest), "--out", str(tmp_path / "store")])
    assert rc == 1 and time.perf_counter() - t0 < 60
    row = pq.read_table(tmp_path / "store" / "slides.parquet").to_pylist()[0]
    assert row["status"] == "failed" and "FIFO" in row["error"]
