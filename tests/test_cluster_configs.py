"""The cluster/ configs load and carry what KubeRay, the AWS launcher and docker need.

Why: these files are only exercised on real clusters, where a typo costs a GPU-hour; checking the fields
each tool requires (and that Ray/torch versions agree with pyproject) catches that here, in milliseconds.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", dep)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


PINS = _pins()
RAY = PINS["ray"]


def _docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / rel).read_text()) if d is not None]


def _one(rel: str, kind: str) -> dict:
    found = [d for d in _docs(rel) if d.get("kind") == kind]
    assert len(found) == 1, f"{rel}: expected one {kind}"
    return found[0]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == RAY, where
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    for c in _containers(head["template"]):
        assert RAY in c["image"], f"{where}: head image {c['image']} not on ray {RAY}"
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), f"{where}: head must be CPU-only"
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    groups = spec["workerGroupSpecs"]
    gpu_groups = []
    for g in groups:
        assert g["groupName"] and "rayStartParams" in g
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1, f"{where}: {g['groupName']} must autoscale from 0"
        for c in _containers(g["template"]):
            assert RAY in c["image"], f"{where}: worker image {c['image']} not on ray {RAY}"
            res = c["resources"]
            if "nvidia.com/gpu" in res.get("limits", {}):
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
                gpu_groups.append(g)
                mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
                volumes = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
                assert any("emptyDir" in volumes.get(n, {}) for n in mounts), f"{where}: no node-local scratch"
    assert gpu_groups, f"{where}: no GPU worker group"
    for pod in [head["template"]] + [g["template"] for g in groups]:
        assert pod["spec"].get("serviceAccountName"), f"{where}: S3 access must come from an IRSA service account"


def test_kuberay_raycluster():
    docs = _docs("kuberay/raycluster.yaml")
    rc = _one("kuberay/raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(rc["spec"], "raycluster.yaml")
    sa = _one("kuberay/raycluster.yaml", "ServiceAccount")
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    assert {d["kind"] for d in docs} == {"RayCluster", "ServiceAccount"}


def test_kuberay_rayjob():
    rj = _one("kuberay/rayjob.yaml", "RayJob")
    assert rj["apiVersion"] == "ray.io/v1"
    spec = rj["spec"]
    assert "jobs.pipeline" in spec["entrypoint"] and "--config" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    assert not any("SECRET" in k or "TOKEN" in k for k in runtime_env.get("env_vars", {}))
    _check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")


def test_aws_launcher():
    cfg = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert RAY in cfg["docker"]["image"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    spot_gpu = [n for n, t in types.items()
                if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
                and t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert spot_gpu, "no spot GPU worker type"
    for name in spot_gpu:
        t = types[name]
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
        assert "Arn" in t["node_config"]["IamInstanceProfile"], "workers need an instance profile for S3"
    assert cfg["max_workers"] >= max(t.get("max_workers", 0) for t in types.values())
    assert cfg["head_start_ray_commands"] and cfg["worker_start_ray_commands"]


def test_dockerfile_matches_pyproject():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == [f"rayproject/ray:{RAY}-py311-gpu"], froms
    # Installs the package itself, so the pins come from pyproject ...
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text)
    # ... and any pin spelled out in the Dockerfile agrees with pyproject.
    for name in ("torch", "torchvision", "ray"):
        for pinned in re.findall(rf"\b{name}(?:\[[^\]]*\])?==([0-9][^\s\"']*)", text):
            assert pinned == PINS[name], f"Dockerfile pins {name}=={pinned}, pyproject {PINS[name]}"
    assert {"torch", "torchvision", "ray"} <= set(PINS), "pyproject must pin torch, torchvision and ray"


SECRET_PATTERNS = [
    re.compile(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}"),
    re.compile(r"AWS_SESSION_TOKEN\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{8,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[A-Za-z0-9]{8,}"),
    re.compile(r"aws_secret_access_key\s*=\s*\S{8,}", re.I),   # ~/.aws/credentials style
]


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in
                                        [*CLUSTER.rglob("*"), *(REPO / "jobs").rglob("*.yaml")] if p.is_file()))
def test_no_secrets(path):
    text = (REPO / path).read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{path}: looks like a credential ({pattern.pattern})"
