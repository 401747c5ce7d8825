"""jobs/: YAML validation (errors name the file and key) and a real `ray job submit` of the pipeline.

Why a real job: the point of jobs/ is that `ray job submit --working-dir . -- python -m jobs.pipeline ...`
works against a running cluster. The only honest check is to start a Ray head with the dashboard (job
server), submit exactly that command and wait for SUCCEEDED.

The head is our own: its own ports and temp dir, started with `ray start --head --block` and ended by
stopping that process and the processes that belong to its session (never `ray stop`, which would also
kill the session-wide `ray_session` fixture's Ray and anybody else's on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from her2ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _base(tmp_path: Path, **extra) -> dict:
    data = {"manifest": str(tmp_path / "m.csv"), "test_manifest": str(tmp_path / "t.csv"),
            "out": str(tmp_path / "out"), "stages": ["evaluate"]}
    data.update(extra)
    return data


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

def test_unknown_top_level_key_names_file_and_key(tmp_path):
    from jobs._common import load_pipeline_config

    cfg = _write(tmp_path / "bad.yaml", _base(tmp_path, outt="x"))
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(cfg)
    assert str(cfg) in str(err.value) and "outt" in str(err.value)


def test_unknown_stage_key_names_file_and_key(tmp_path):
    from jobs._common import load_pipeline_config

    cfg = _write(tmp_path / "bad.yaml", _base(tmp_path, evaluate={"n_bootstrap": 5}))
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(cfg)
    msg = str(err.value)
    assert str(cfg) in msg and "evaluate.n_bootstrap" in msg and "n_boot" in msg  # lists the known keys


def test_stage_value_checked_with_the_cli_types(tmp_path):
    from jobs._common import load_pipeline_config

    cfg = _write(tmp_path / "bad.yaml", _base(tmp_path, evaluate={"n-boot": "many"}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: evaluate\.n-boot: invalid value 'many'"):
        load_pipeline_config(cfg)


def test_wired_paths_cannot_be_overridden(tmp_path):
    from jobs._common import load_pipeline_config

    cfg = _write(tmp_path / "bad.yaml", _base(tmp_path, evaluate={"out": "/elsewhere"}))
    with pytest.raises(ConfigError, match=r"evaluate\.out: set by the pipeline"):
        load_pipeline_config(cfg)


def test_unknown_stage_and_missing_test_manifest(tmp_path):
    from jobs._common import load_pipeline_config

    with pytest.raises(ConfigError, match="stages"):
        load_pipeline_config(_write(tmp_path / "a.yaml", _base(tmp_path, stages=["embedd"])))
    data = _base(tmp_path)
    del data["test_manifest"]
    with pytest.raises(ConfigError, match=r"a\.yaml: test_manifest: required by stage\(s\) evaluate"):
        load_pipeline_config(_write(tmp_path / "a.yaml", data))


def test_argv_wiring(tmp_path):
    from jobs._common import load_pipeline_config, stage_argv

    cfg = load_pipeline_config(_write(tmp_path / "ok.yaml", _base(tmp_path, evaluate={"n_boot": 7})))
    argv = stage_argv("evaluate", cfg)
    out = str(tmp_path / "out")
    assert argv[0] == "evaluate"
    assert argv[argv.index("--predictions") + 1] == f"{out}/predictions/predictions.parquet"
    assert argv[argv.index("--manifest") + 1] == str(tmp_path / "t.csv")
    assert argv[argv.index("--out") + 1] == f"{out}/evaluation"
    assert argv[argv.index("--n-boot") + 1] == "7"


@pytest.mark.parametrize("name", ["local.yaml", "s3.yaml", "tiny.yaml"])
def test_example_configs_validate(name, monkeypatch, capsys):
    """Every shipped example is valid against the current stage CLIs (dry run prints the commands)."""
    from jobs._common import job_main

    assert job_main(None, ["--config", str(CONFIGS / name), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["embed", "train", "score", "evaluate", "heatmap"]
    if name == "s3.yaml":
        assert all("s3://her2ray-example-bucket/runs/" in line for line in lines)


def test_job_cli_reports_config_errors(tmp_path):
    """`python -m jobs.<stage>` prints a clean one-line error (exit 2), no traceback."""
    cfg = _write(tmp_path / "bad.yaml", _base(tmp_path, evaluate={"bogus": 1}))
    proc = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{cfg}: evaluate.bogus: unknown key" in proc.stderr


# --------------------------------------------------------------------------------------------------
# A real Ray job
# --------------------------------------------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_processes(marker: str):
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return procs


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """End exactly the processes of our head: `ray start --block`, then what is left of its session."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            head.kill()
    leftovers = _session_processes(temp_dir)
    for p in list(leftovers):
        try:
            leftovers += p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in leftovers:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def ray_head():
    """A private Ray head with the job server: yields the dashboard URL; always torn down."""
    gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="h2rjob-", dir="/tmp")  # short: unix socket paths are <108 chars
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cmd = ["ray", "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp_dir}",
           "--object-store-memory=400000000", "--disable-usage-stats"]
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 90
        while True:
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if head.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail("ray head did not come up:\n" + Path(log.name).read_text()[-3000:])
                time.sleep(1)
        yield url
    finally:
        _stop_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def tiny_cohort(tmp_path):
    """12 small synthetic slides (3 per class, 2 centers), about a third held out as the test set."""
    from her2ray.demo import holdout_split, write_manifest
    from her2ray.synth import synth_cohort

    rows = synth_cohort(str(tmp_path / "cohort"), 12, centers=["a", "b"], seed=1, width_px=1024, height_px=1024)
    train, test = holdout_split(rows, 0.34, seed=1)
    return (write_manifest(train, tmp_path / "cohort" / "train.csv"),
            write_manifest(test, tmp_path / "cohort" / "test.csv"))


@pytest.mark.slow
def test_ray_job_submit_pipeline(ray_head, tiny_cohort, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    train_csv, test_csv = tiny_cohort
    data = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    out = tmp_path / "run"
    data.update(manifest=train_csv, test_manifest=test_csv, out=str(out))
    cfg = _write(tmp_path / "tiny-run.yaml", data)

    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    submit = subprocess.run(
        ["ray", "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--no-wait",
         "--submission-id", f"her2ray-test-{os.getpid()}", "--entrypoint-num-cpus", "0",
         "--", "python", "-m", "jobs.pipeline", "--config", str(cfg)],
        env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = f"her2ray-test-{os.getpid()}"

    client = JobSubmissionClient(ray_head)
    deadline = time.time() + 600
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]

    # Stage banners and the attach-to-cluster path (not a private local Ray) are in the job log.
    assert "Ray: connecting stages to" in logs
    for stage in ("embed", "train", "score", "evaluate", "heatmap"):
        assert f"] {stage} done in" in logs
    # The file contracts of every stage exist.
    assert list((out / "store" / "features").glob("*.parquet"))
    assert (out / "store" / "slides.parquet").exists()
    assert (out / "run" / "splits.parquet").exists()
    assert (out / "predictions" / "predictions.parquet").exists()
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert "auc_macro_ovr" in metrics
    assert (out / "evaluation" / "report.md").exists()
    assert list((out / "heatmaps").rglob("*.png"))
