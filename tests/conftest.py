"""Shared fixtures: the real test data, one local Ray per session, and a real S3-protocol server on loopback.

The S3 endpoint and fake credentials are put in the environment at import time, before Ray starts, so
Ray workers inherit them exactly as a cluster's workers would inherit an instance role's settings.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = _free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": S3_ENDPOINT,
})
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_var, None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real slides and tiles (../shared/data beside the checkout, or $HER2RAY_SHARED_DATA)."""
    path = Path(os.environ.get("HER2RAY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (path / "slides" / "CMU-1-Small-Region.svs").exists():
        pytest.fail(f"test data not found at {path}: set HER2RAY_SHARED_DATA to the shared/data folder")
    return path


@pytest.fixture
def one_torch_thread():
    """2 shared cores: intra-op threads only add contention for these tiny models."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def cmu_small_region(shared_data) -> Path:
    """Real Aperio slide: 2220 x 2967 px, 0.499 um/px, one level."""
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


TINY_ENCODER_CFG = {"embed_dim": 16, "quick_gelu": True,
                    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}}


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A tiny open_clip-format image tower (random weights, fixed seed) in a folder."""
    import torch
    from open_clip.model import _build_vision_tower

    from her2ray.encoders import write_open_clip_dir

    torch.manual_seed(7)
    tower = _build_vision_tower(TINY_ENCODER_CFG["embed_dim"], TINY_ENCODER_CFG["vision_cfg"], quick_gelu=True)
    return write_open_clip_dir(tower.state_dict(), TINY_ENCODER_CFG, str(tmp_path_factory.mktemp("tiny_enc")))


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto server mode) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield S3_ENDPOINT
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the loopback S3 server; yields ``s3://<bucket>``."""
    import boto3

    name = f"her2ray-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
