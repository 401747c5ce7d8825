"""build_kernels: grid indices, official down-sampling, KMeans anchors, anchor distances, memory bound."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.cluster import KMeans

from her2ray.models import kernels
from her2ray.models.kat import KernelPlan, build_kernels
from her2ray.models.kernels import down_sampling_factor, grid_indices, num_kernels



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """KMeans' OpenMP threads spin-wait badly on a loaded 2-core box; results do not depend on threads."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


STRIDE = 512.8  # a fractional level-0 grid stride, as at 0.5 um/px on a 0.2495 um/px scanner


def _tissue(n_rows, n_cols, row0=0, col0=0, seed=0, keep=0.8):
    """Pixel (x, y) of a blobby tissue region on a grid of stride STRIDE, shuffled; plus its (row, col)."""
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    inside = ((rr - n_rows / 2) / (n_rows / 2)) ** 2 + ((cc - n_cols / 2) / (n_cols / 2)) ** 2 <= 1.0
    inside &= rng.random(inside.shape) < keep
    rc = np.stack([rr[inside] + row0, cc[inside] + col0], axis=1)
    rc = rc[rng.permutation(len(rc))]
    xy = np.stack([np.rint(rc[:, 1] * STRIDE), np.rint(rc[:, 0] * STRIDE)], axis=1).astype(np.int64)
    return xy, rc


def _row_major(rc):
    return np.lexsort((rc[:, 1], rc[:, 0]))


def test_grid_indices_with_fractional_stride_and_errors():
    xy, rc = _tissue(20, 30, row0=7, col0=3)
    np.testing.assert_array_equal(grid_indices(xy, STRIDE), rc)
    with pytest.raises(ValueError, match="not on a grid"):
        grid_indices(xy + np.array([[STRIDE / 2, 0]]).astype(np.int64) * (np.arange(len(xy)) % 2)[:, None], STRIDE)
    with pytest.raises(ValueError, match="grid cell"):
        grid_indices(np.concatenate([xy, xy[:1]]), STRIDE)
    with pytest.raises(ValueError, match="empty"):
        grid_indices(np.zeros((0, 2)), STRIDE)


def test_official_counts():
    assert down_sampling_factor(4096, 4096) == 1
    assert down_sampling_factor(4097, 4096) == 2
    assert down_sampling_factor(10_000, 4096) == 2
    assert down_sampling_factor(30_000, 4096) == 3
    assert down_sampling_factor(100_000, 4096) == 5
    assert num_kernels(4000, 144) == 28 and num_kernels(144, 144) == 2 and num_kernels(1, 144) == 1
    assert num_kernels(5, 1) == 5    # int(n/npk) = n is not < n: capped at n


def test_no_down_sampling_below_max_nodes_and_kmeans_equivalence():
    xy, rc = _tissue(30, 40, row0=2, col0=5, seed=1)
    plan = build_kernels(xy, STRIDE, npk=36, max_nodes=4096)
    assert isinstance(plan, KernelPlan) and plan.down_factor == 1
    order = _row_major(rc)
    np.testing.assert_array_equal(plan.kept, order)                 # official row-major order
    np.testing.assert_array_equal(plan.grid_rc, rc[order])
    pos = rc[order]
    # The official call, made directly with sklearn.
    km = KMeans(n_clusters=int(len(pos) / 36) + 1, random_state=9, max_iter=10, n_init="auto")
    expected = np.argmin(km.fit(pos).transform(pos), axis=0)
    np.testing.assert_array_equal(plan.anchors, expected)
    assert plan.n_kernels == int(len(pos) / 36) + 1
    # Distances: exact Euclidean in grid units, float32, [m, n].
    ref = np.sqrt(((pos[expected][:, None, :] - pos[None, :, :]) ** 2).sum(-1))
    assert plan.anchor_dist.dtype == np.float32 and plan.anchor_dist.shape == (len(expected), len(pos))
    np.testing.assert_array_equal(plan.anchor_dist, ref.astype(np.float32))
    np.testing.assert_array_equal(plan.anchor_dist[np.arange(plan.n_kernels), plan.anchors], 0)


def test_n_init_is_passed_through():
    xy, rc = _tissue(25, 25, seed=2)
    pos = rc[_row_major(rc)]
    plan = build_kernels(xy, STRIDE, npk=16, n_init=10)
    km = KMeans(n_clusters=int(len(pos) / 16) + 1, random_state=9, max_iter=10, n_init=10)
    np.testing.assert_array_equal(plan.anchors, np.argmin(km.fit(pos).transform(pos), axis=0))


def test_down_sampling_keeps_absolute_lattice_cells():
    xy, rc = _tissue(40, 50, row0=3, col0=6, seed=3, keep=1.0)
    n = len(rc)
    plan = build_kernels(xy, STRIDE, npk=16, max_nodes=100)
    df = int(np.sqrt(n / 100)) + 1
    assert plan.down_factor == df >= 2
    keep = (rc[:, 0] % df == 0) & (rc[:, 1] % df == 0)             # [::df, ::df] of the full slide grid
    idx = np.flatnonzero(keep)
    idx = idx[_row_major(rc[idx])]
    np.testing.assert_array_equal(plan.kept, idx)
    assert plan.grid_rc[:, 0].min() % df == 0 and plan.grid_rc.min() > 0
    pos = rc[idx]
    km = KMeans(n_clusters=int(len(pos) / 16) + 1, random_state=9, max_iter=10, n_init="auto")
    anchors = np.argmin(km.fit(pos).transform(pos), axis=0)
    np.testing.assert_array_equal(plan.anchors, anchors)
    ref = np.sqrt(((pos[anchors][:, None, :] - pos[None, :, :]) ** 2).sum(-1)) / df   # sampled-grid units
    np.testing.assert_allclose(plan.anchor_dist, ref, rtol=1e-6)
    # Neighbouring kept tiles are 1 sampled-grid unit apart.
    assert np.isclose(np.sort(np.unique(plan.anchor_dist))[1], 1.0)


def test_empty_lattice_falls_back_to_most_populated_phase():
    # A diagonal line of 300 tiles: with max_nodes 100, df = 2 and no cell has row and col both even.
    rc = np.stack([np.arange(300), np.arange(300) + 1], axis=1)
    xy = np.stack([rc[:, 1] * 256, rc[:, 0] * 256], axis=1)
    plan = build_kernels(xy, 256, npk=16, max_nodes=100)
    assert plan.down_factor == 2 and plan.n_tiles == 150
    phases = set(map(tuple, plan.grid_rc % 2))
    assert phases == {(0, 1)}        # both populated phases hold 150 tiles; the lowest phase index wins


def test_chunked_anchor_search_equals_full(monkeypatch):
    xy, rc = _tissue(30, 30, seed=4)
    full = build_kernels(xy, STRIDE, npk=9)
    monkeypatch.setattr(kernels, "_ROWS_PER_CHUNK", 7)
    monkeypatch.setattr(kernels, "_ANCHORS_PER_CHUNK", 3)
    chunked = build_kernels(xy, STRIDE, npk=9)
    np.testing.assert_array_equal(chunked.anchors, full.anchors)
    np.testing.assert_array_equal(chunked.anchor_dist, full.anchor_dist)


def test_single_tile_slide():
    plan = build_kernels(np.array([[1024, 2048]]), 512.0, npk=144)
    assert plan.n_tiles == 1 and plan.n_kernels == 1
    np.testing.assert_array_equal(plan.anchor_dist, [[0.0]])
    np.testing.assert_array_equal(plan.grid_rc, [[4, 2]])


def test_100k_tiles_never_allocate_n_squared():
    xy, rc = _tissue(360, 360, seed=5, keep=0.98)
    n = len(xy)
    assert n >= 98_000
    tracemalloc.start()
    try:
        plan = build_kernels(xy, STRIDE, npk=144, max_nodes=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan.down_factor == 5
    assert plan.n_tiles <= 4096 and plan.n_kernels == int(plan.n_tiles / 144) + 1
    assert peak < 64 * 2 ** 20, f"peak {peak / 2 ** 20:.1f} MiB"          # N^2 * 4 bytes would be ~40 GB
    assert peak < n * n * 4 / 500
