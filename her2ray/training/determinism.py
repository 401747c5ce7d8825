"""Pinned numerics for a fold: the same thread count and algorithm settings wherever the fold runs.

Why: CPU reductions (matmul blocking, ``sum``) and OpenMP KMeans split work by thread count, so a fold that
gets 1 thread when 5 folds share 2 cores and 2 threads when run alone would produce different bits. Ray and
the machine decide ``cpus_per_fold``; the numbers must not depend on it. Every fold therefore runs with
``torch.set_num_threads(TrainConfig.torch_threads)`` (default 1, recorded in result.json and metrics.json)
and KMeans runs single-threaded (``models.kernels``). ``deterministic=True`` additionally switches on
``torch.use_deterministic_algorithms`` (for GPUs; on CPU the ops KAT/ABMIL use are deterministic already).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def pinned_compute(threads: int, deterministic: bool = False) -> Iterator[None]:
    """Set torch's intra-op threads (and deterministic algorithms when asked); restore both afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, int(threads)))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if deterministic:
            torch.use_deterministic_algorithms(old_det)


def compute_record(threads: int, deterministic: bool, device: Any) -> dict[str, Any]:
    """What determined the numerics of a fold (goes into result.json and metrics.json)."""
    return {"torch_threads": int(threads), "deterministic_algorithms": bool(deterministic),
            "device": torch.device(device).type, "torch_version": torch.__version__}
