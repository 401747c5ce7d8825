"""Per-node resource sizing: every request (embed actor, scoring actor, training fold) must fit ONE node.

Why per node: Ray places an actor or a task on a single node, so the cluster *total* says nothing about
whether a request can ever run. Two nodes of 1 CPU give ``cluster_resources() == {"CPU": 2}``, yet an actor
asking for 2 CPUs waits forever. So sizing defaults come from the largest node (GPU nodes separately), and
every explicit request is checked against the live nodes and, when the cluster has an autoscaler, against
the node types it may still add. A request that fits nowhere fails in seconds with a ``ResourceFitError``
naming the request and the nodes, instead of hanging with 0 slides done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import ConfigError

log = logging.getLogger(__name__)

#: resources compared when checking a request (others, such as memory, are left to Ray)
CHECKED = ("CPU", "GPU")


class ResourceFitError(ConfigError):
    """No live node (and no node type the autoscaler can add) can host one unit of the request."""


@dataclass(frozen=True)
class NodeShape:
    """What one node (or one autoscaler node type) offers: CPU and GPU counts and a name for messages."""

    name: str
    cpu: float
    gpu: float
    can_add: bool = False            # an autoscaler node type (not running yet), not a live node

    def fits(self, request: Mapping[str, float]) -> bool:
        return (float(request.get("CPU", 0.0)) <= self.cpu + 1e-9
                and float(request.get("GPU", 0.0)) <= self.gpu + 1e-9)

    def describe(self) -> str:
        kind = "node type (autoscaler)" if self.can_add else "node"
        return f"{kind} {self.name}: CPU={_fmt(self.cpu)}, GPU={_fmt(self.gpu)}"


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def live_nodes(ray_module=None) -> list[NodeShape]:
    """Alive nodes of the connected Ray cluster (``ray.nodes()``), with their total CPU/GPU."""
    import ray

    ray_module = ray_module or ray
    out = []
    for n in ray_module.nodes():
        if not n.get("Alive", False):
            continue
        res = n.get("Resources") or {}
        name = f"{n.get('NodeManagerAddress', '?')} ({str(n.get('NodeID', ''))[:8]})"
        out.append(NodeShape(name=name, cpu=float(res.get("CPU", 0.0)), gpu=float(res.get("GPU", 0.0))))
    return out


def autoscaler_node_types() -> list[NodeShape]:
    """Node types an autoscaler may add (from the cluster config Ray keeps in the GCS); [] without one.

    Uses Ray's private state accessor (the same one Ray Data's autoscaler reads); any failure means "none".
    """
    try:
        import ray._private.state as ray_state

        config = ray_state.state.get_cluster_config()
    except Exception as exc:  # noqa: BLE001 - private API, absent on plain local clusters
        log.debug("no autoscaler config: %s", exc)
        return []
    if config is None:
        return []
    out = []
    for group in getattr(config, "node_group_configs", []):
        if int(getattr(group, "max_count", 0)) == 0:
            continue
        res = dict(group.resources)
        out.append(NodeShape(name=str(getattr(group, "name", "?")), cpu=float(res.get("CPU", 0.0)),
                             gpu=float(res.get("GPU", 0.0)), can_add=True))
    return out


def cluster_shapes(ray_module=None) -> list[NodeShape]:
    """Live nodes plus the node types the autoscaler can add."""
    return live_nodes(ray_module) + autoscaler_node_types()


def largest_cpu(shapes: Sequence[NodeShape], *, gpu_nodes: bool | None = None) -> float:
    """CPUs of the biggest node (``gpu_nodes``: only GPU nodes / only CPU-only nodes / any when None)."""
    pick = [s for s in shapes if gpu_nodes is None or (s.gpu > 0) == gpu_nodes]
    return max((s.cpu for s in pick), default=0.0)


def largest_gpu(shapes: Sequence[NodeShape]) -> float:
    return max((s.gpu for s in shapes), default=0.0)


def total(shapes: Sequence[NodeShape], key: str) -> float:
    """Sum over LIVE nodes only (what is there now)."""
    return sum((s.cpu if key == "CPU" else s.gpu) for s in shapes if not s.can_add)


def describe_request(request: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={_fmt(float(v))}" for k, v in request.items() if float(v) > 0) or "nothing"


def check_fits(request: Mapping[str, float], shapes: Sequence[NodeShape], *, what: str, hint: str) -> None:
    """Raise ``ResourceFitError`` unless one unit of ``request`` fits on at least one node (or node type)."""
    need = {k: float(v) for k, v in request.items() if k in CHECKED and v}
    if not need or any(s.fits(need) for s in shapes):
        return
    nodes = "; ".join(s.describe() for s in shapes) or "no live node"
    raise ResourceFitError(f"{what} asks for {describe_request(need)} on ONE node, but no node can host it "
                           f"({nodes}). {hint}")


def actor_request(plan: Mapping[str, Any]) -> dict[str, float]:
    """The per-actor request of a ``plan_for_nodes`` plan, as Ray resources."""
    if plan.get("num_gpus"):
        return {"GPU": float(plan["num_gpus"])}
    return {"CPU": float(plan.get("num_cpus") or 1.0)}


def plan_for_nodes(shapes: Sequence[NodeShape], n_todo: int, *, num_actors: int | None = None,
                   num_gpus_per_actor: float | None = None, num_cpus_per_actor: float | None = None,
                   max_cpus_per_actor: float = 4.0) -> dict[str, Any]:
    """Actor count and per-actor resources sized from per-node shapes (see the module docstring).

    GPU actors: one per GPU (or per fraction) on the GPU nodes. CPU actors: ``num_cpus_per_actor`` or
    min(``max_cpus_per_actor``, CPUs of the largest node), as many as fit node by node.
    """
    live = [s for s in shapes if not s.can_add]
    gpus = total(live, "GPU")
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if largest_gpu(shapes) >= 1 else 0.0
    if num_gpus_per_actor < 0:
        raise ConfigError(f"--num-gpus-per-actor must be >= 0, got {num_gpus_per_actor}")
    if num_gpus_per_actor > 0:
        if gpus == 0:
            log.warning("GPU actors requested but no live node has a GPU yet (autoscaling?); actors wait for one")
        per_node = sum(int(s.gpu // num_gpus_per_actor + 1e-9) for s in live)
        n = num_actors or max(1, per_node)
        plan: dict[str, Any] = {"num_gpus": float(num_gpus_per_actor), "device": None, "torch_threads": None}
    else:
        c = float(num_cpus_per_actor or max(1.0, min(max_cpus_per_actor, largest_cpu(shapes) or 1.0)))
        per_node = sum(int(s.cpu // c + 1e-9) for s in live)
        n = num_actors or max(1, per_node)
        plan = {"num_cpus": c, "device": "cpu", "torch_threads": max(1, int(c))}
    plan["num_actors"] = max(1, min(int(n), max(1, n_todo)))
    return plan


__all__ = ["NodeShape", "actor_request", "ResourceFitError", "autoscaler_node_types", "check_fits", "cluster_shapes",
           "describe_request", "largest_cpu", "largest_gpu", "live_nodes", "plan_for_nodes", "total"]
