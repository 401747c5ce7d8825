"""Build every slide graph once, before the folds start (graph models only: SlideGraph+).

Why: each fold trains on most of the cohort, so concurrent folds would otherwise all build the same graphs at
the same time on a first run. Here each slide's graph is built once, as one Ray task per slide (or
sequentially with ``local``), into the content-keyed cache beside the features; the folds then only read it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _build_one(url: str, settings: dict[str, Any]) -> bool:
    """True when the graph was already cached."""
    from ..models.slidegraph_data import graph_params, load_graph

    return load_graph(url, graph_params(settings))[2]


def prebuild_graphs(urls: list[str], settings: dict[str, Any], local: bool = False) -> dict[str, int]:
    """Fill the graph cache for ``urls``; returns ``{"cached": n, "built": n}``."""
    urls = sorted(set(urls))
    if local:
        hits = [_build_one(u, settings) for u in urls]
    else:
        import ray

        task = ray.remote(num_cpus=1)(_build_one)
        hits = ray.get([task.remote(u, settings) for u in urls])
    counts = {"cached": int(sum(hits)), "built": int(len(hits) - sum(hits))}
    log.info("slide graphs: %d built, %d read from the cache", counts["built"], counts["cached"])
    return counts
