"""``her2ray demo``: the pass/fail rule, the held-out split, and one reduced end-to-end run.

The full-size demo (48 slides, 5 folds) is measured by hand, not in the suite; the reduced run here checks
that every stage runs from the one command, that outputs and the summary land under --out, and that the
random-weights notice is printed and written.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from her2ray.demo import RANDOM_WEIGHTS_NOTICE, check_auc, holdout_split


def test_check_auc_says_what_held():
    ok, msg = check_auc({"auc_macro_ovr": 0.95}, 0.9)
    assert ok and "PASSED" in msg and "0.950" in msg
    ok, msg = check_auc({"auc_macro_ovr": 0.71}, 0.9)
    assert not ok and "FAILED" in msg and "0.710 < 0.90" in msg
    for metrics in (None, {}, {"auc_macro_ovr": math.nan}):
        ok, msg = check_auc(metrics, 0.9)
        assert not ok and "not available" in msg


def test_holdout_split_is_stratified_and_patient_disjoint():
    rows = [{"slide_id": f"s{i}", "patient_id": f"p{i // 2}", "her2_score": ["0", "1+", "2+", "3+"][(i // 2) % 4]}
            for i in range(48)]
    train, test = holdout_split(rows, 0.25, seed=0)
    assert len(train) + len(test) == 48 and 8 <= len(test) <= 16
    assert set(Counter(r["her2_score"] for r in test)) == {"0", "1+", "2+", "3+"}
    assert not {r["patient_id"] for r in train} & {r["patient_id"] for r in test}
    assert holdout_split(rows, 0.25, seed=0) == (train, test)  # deterministic


#: console lines that mean Ray (not her2ray) is talking: none may reach the terminal of a default run
RAY_NOISE = ("Traceback", "Exception in thread", "core_worker", "raylet", "PlacementGroupCleaner",
             "Progress bars disabled", "multiple active Ray instances", "worker.py", "(pid=", ".cc:",
             "Started a local Ray instance", "Checkpoint successfully created", "ray.train", "ray.data")


@pytest.fixture
def second_ray(tmp_path_factory):
    """A second, unrelated Ray on this machine (`ray start --head --block`), stopped by this fixture only.

    Its temp dir is private (others' ``ray.init()`` never join it); its GCS process is visible to every
    process on the machine, which is what made Ray Train's cleaner thread crash in the first-hour report.
    """
    import os
    import signal
    import socket
    import subprocess
    import tempfile
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp_dir = tempfile.mkdtemp(prefix="r2-", dir="/tmp")      # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(["ray", "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "ray start exited early"
                time.sleep(1)
        else:
            pytest.fail("second Ray did not start within 120 s")
        yield f"127.0.0.1:{port}"
    finally:
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_demo_reduced_run(tmp_path, capfd, second_ray):
    """The demo next to another Ray: it runs, and its console holds her2ray's lines only (Ray's go to a log)."""
    from her2ray.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--n-slides", "16", "--folds", "2", "--max-epochs", "3",
               "--patience", "3", "--slide-px", "1024", "--min-auc", "0"])
    captured = capfd.readouterr()
    printed, console = captured.out, captured.out + captured.err
    assert rc == 0, console[-4000:]
    assert RANDOM_WEIGHTS_NOTICE in printed
    for stage in ("synth", "embed", "train", "score", "evaluate", "heatmap"):
        assert f"] {stage} done in" in printed, stage
    assert "Report:" in printed and "ROC plot:" in printed and "Heatmap:" in printed
    assert "CHECK PASSED" in printed

    # quiet console: no Ray line reached the terminal; they are all in the run's log, named at the end
    noisy = [line for line in console.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noisy, "\n".join(noisy[:20])
    log_file = out / "logs" / "demo-ray.log"
    assert console.rstrip().endswith(f"Ray and library output: {log_file}")
    ray_log = log_file.read_text()
    assert "Connecting to existing Ray cluster" in ray_log and "===== her2ray train" in ray_log   # stages' Ray lines
    # honest summaries: start-up reported apart from throughput
    assert "start-up" in printed and "s of embedding" in printed and "s of scoring" in console
    assert "time: start-up" in printed

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["weights"] == RANDOM_WEIGHTS_NOTICE and summary["weights_are_real"] is False
    assert summary["n_slides"] == 16 and summary["n_test"] >= 4
    assert "auc_macro_ovr" in summary["test_metrics"]
    for key in ("report", "roc_png", "heatmap_png", "predictions", "metrics"):
        assert summary["outputs"][key], key
    assert (out / "readme" / "roc.png").exists() and (out / "readme" / "heatmap.png").exists()
    report = (out / "demo_report.md").read_text()
    assert RANDOM_WEIGHTS_NOTICE in report
    assert RANDOM_WEIGHTS_NOTICE in (out / "evaluation" / "report.md").read_text()
