"""KAT kernel (anchor) construction: tile grid -> down-sampling -> KMeans anchors -> anchor-to-tile distances.

Why this module exists: KAT has no positional embedding; all spatial information reaches the model through
the anchor-to-tile distances used by its Gaussian masks. To reuse official checkpoints (and to reproduce the
official behaviour) those distances must be built exactly as the official ``cnn_wsi_encode.py`` + loader do
(see /work/shared/design/kat.md sections 2.2, 2.3 and 3):

1. Tile positions become integer (row, col) indices on the tile grid (grid units, not pixels).
2. If more than ``max_nodes`` tiles exist, the grid is down-sampled: ``down_factor = int(sqrt(N/max_nodes))+1``
   and only cells whose *absolute* row and column are multiples of it are kept (the official ``[::df, ::df]``
   on the slide's full grid). Tiles are discarded, not pooled.
3. Kept tiles are put in row-major order (the official ``np.where`` order; KMeans++ seeding depends on it).
4. ``KMeans(n_clusters=int(n/npk)+1 (capped at n), random_state=9, max_iter=10)`` on the (row, col) indices;
   each anchor is the tile nearest to a cluster centre (lowest index on ties, no de-duplication).
5. ``anchor_dist[k, i]`` = Euclidean distance between anchor k and tile i in original grid units divided by
   ``down_factor`` (i.e. in units of the sampled grid), float32.

Memory: only O(m*n) arrays are built (m anchors, n kept tiles, m ~ n/npk); the official N x N distance matrix
is never formed, so 100k-tile slides are fine.

Deliberate deviations (documented, not silent):
- The official loader truncates to the first ``max_nodes`` tiles (row-major) and the first
  ``int(max_nodes/npk)+1`` anchors when, after down-sampling, more remain. That needs an unlucky grid alignment
  (the expected kept count is below ``max_nodes``); we keep every kept tile and anchor instead
  (attention cost is linear in both, and the trained weights do not depend on it).
- If the ``[::df, ::df]`` lattice hits no tissue tile at all (official code would crash in KMeans), the lattice
  phase (row % df, col % df) holding the most tiles is used instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Tiles per kernel used by the official configs (``KAT.PATCH_PER_KERNEL``).
DEFAULT_NPK = 144
#: The official ``FEATURE.MAX_NODES``.
DEFAULT_MAX_NODES = 4096
#: The official ``random_state`` of the anchor KMeans.
OFFICIAL_KMEANS_SEED = 9
#: The official ``max_iter`` of the anchor KMeans (not necessarily converged; kept for parity).
OFFICIAL_KMEANS_MAX_ITER = 10

_ROWS_PER_CHUNK = 8192      # bounds the KMeans.transform temporaries to chunk x m
_ANCHORS_PER_CHUNK = 64     # bounds the float64 distance temporaries to chunk x n


@dataclass
class KernelPlan:
    """Everything KAT needs about one slide's geometry.

    Attributes:
        kept: int64 [n] indices into the input ``coords`` of the tiles the model sees, in row-major grid order.
        anchors: int64 [m] indices into ``kept`` of the anchor tiles, in KMeans cluster-label order.
        down_factor: grid down-sampling factor (1 = no down-sampling).
        anchor_dist: float32 [m, n] anchor-to-tile Euclidean distance in sampled-grid units
            (original grid units / down_factor), columns aligned with ``kept``.
        grid_rc: int64 [n, 2] absolute (row, col) grid indices of the kept tiles, original grid units.
    """

    kept: np.ndarray
    anchors: np.ndarray
    down_factor: int
    anchor_dist: np.ndarray
    grid_rc: np.ndarray

    @property
    def n_tiles(self) -> int:
        return int(len(self.kept))

    @property
    def n_kernels(self) -> int:
        return int(len(self.anchors))


def grid_indices(coords: np.ndarray, tile_px: float) -> np.ndarray:
    """(x, y) tile top-left positions -> int64 [N, 2] absolute (row, col) grid indices.

    ``tile_px`` is the grid stride in the units of ``coords`` (level-0 pixels; may be fractional, e.g. 512.8).
    Indices are ``round(y / stride)``, ``round(x / stride)``, computed as the index of the top-left-most tile plus
    rounded offsets, so integer rounding of pixel positions never shifts a tile to a neighbouring cell.
    Raises ValueError if the tiles are not on a grid of this stride or two tiles share a cell.
    """
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"coords must have shape [N, 2] (x, y); got {xy.shape}")
    if len(xy) == 0:
        raise ValueError("coords is empty: a slide needs at least one tile")
    stride = float(tile_px)
    if not math.isfinite(stride) or stride <= 0:
        raise ValueError(f"tile_px (grid stride) must be a positive number, got {tile_px!r}")
    origin = xy.min(axis=0)
    offsets = (xy - origin) / stride
    rounded = np.rint(offsets)
    off_grid = np.abs(offsets - rounded).max()
    if off_grid > 0.25:
        raise ValueError(
            f"tile coordinates are not on a grid of stride {stride:g}: a tile is {off_grid:.2f} strides off; "
            "pass the grid stride (FeatureFileMeta.tile_size_level0_px) in the units of coords")
    rc = (rounded + np.rint(origin / stride)).astype(np.int64)[:, ::-1]  # (x, y) -> (row, col)
    rc = np.ascontiguousarray(rc)
    order = np.lexsort((rc[:, 1], rc[:, 0]))
    dup = np.all(rc[order[1:]] == rc[order[:-1]], axis=1)
    if dup.any():
        i = order[1:][dup][0]
        raise ValueError(f"two tiles fall into grid cell (row, col) = {tuple(rc[i])}: wrong tile_px "
                         f"({stride:g}) or duplicate tiles")
    return rc


def down_sampling_factor(n_tiles: int, max_nodes: int) -> int:
    """Official grid down-sampling factor: 1 if ``n_tiles <= max_nodes`` else ``int(sqrt(n/max_nodes)) + 1``."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
    if n_tiles <= max_nodes:
        return 1
    return int(np.sqrt(n_tiles / max_nodes)) + 1


def num_kernels(n_tiles: int, npk: int) -> int:
    """Official anchor count: ``int(n/npk) + 1``, capped at ``n``."""
    if npk < 1:
        raise ValueError(f"npk must be >= 1, got {npk}")
    k = int(n_tiles / npk)
    return k + 1 if k < n_tiles else int(n_tiles)


def _lattice_keep(rc: np.ndarray, df: int) -> np.ndarray:
    """Boolean keep-mask of the official ``[::df, ::df]`` sub-lattice on absolute grid indices."""
    keep = (rc[:, 0] % df == 0) & (rc[:, 1] % df == 0)
    if keep.any():
        return keep
    # Official code would crash (KMeans on zero tiles); use the most populated lattice phase instead.
    phase = (rc[:, 0] % df) * df + (rc[:, 1] % df)
    best = int(np.bincount(phase, minlength=df * df).argmax())
    return phase == best


def select_anchors(grid_rc: np.ndarray, n_clusters: int, *, seed: int = OFFICIAL_KMEANS_SEED,
                   n_init: int | str = "auto", max_iter: int = OFFICIAL_KMEANS_MAX_ITER) -> np.ndarray:
    """Anchor tile indices: KMeans on (row, col), then for each centre the nearest tile (argmin over tiles).

    Equivalent to the official ``np.argmin(KMeans(...).fit(pos).transform(pos), axis=0)`` (ties -> lowest
    index), but ``transform`` runs on row chunks so only chunk x m distances exist at any time.

    KMeans runs on one OpenMP/BLAS thread: its per-thread partial sums make the centres (hence the anchors)
    depend on the thread count otherwise, and the anchors must be identical in training and scoring on any
    machine. A few thousand 2-D points take milliseconds either way.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    km = KMeans(n_clusters=n_clusters, random_state=seed, max_iter=max_iter, n_init=n_init)
    with threadpool_limits(limits=1):
        km.fit(grid_rc)
    best_d = np.full(n_clusters, np.inf)
    best_i = np.zeros(n_clusters, dtype=np.int64)
    for start in range(0, len(grid_rc), _ROWS_PER_CHUNK):
        d = km.transform(grid_rc[start:start + _ROWS_PER_CHUNK])          # [chunk, m]
        i = d.argmin(axis=0)                                               # lowest index within chunk
        v = d[i, np.arange(n_clusters)]
        better = v < best_d                                                # strict: earlier chunk wins ties
        best_d[better] = v[better]
        best_i[better] = i[better] + start
    return best_i


def anchor_distances(grid_rc: np.ndarray, anchors: np.ndarray, down_factor: int = 1) -> np.ndarray:
    """float32 [m, n]: Euclidean distance (original grid units / down_factor) from each anchor to each tile.

    Computed directly from integer differences (exact squares), in anchor chunks: O(m*n) memory.
    """
    pos = np.asarray(grid_rc, dtype=np.int64)
    out = np.empty((len(anchors), len(pos)), dtype=np.float32)
    for start in range(0, len(anchors), _ANCHORS_PER_CHUNK):
        a = pos[np.asarray(anchors[start:start + _ANCHORS_PER_CHUNK])]           # [c, 2]
        dr = (a[:, None, 0] - pos[None, :, 0]).astype(np.float64)
        dc = (a[:, None, 1] - pos[None, :, 1]).astype(np.float64)
        out[start:start + len(a)] = np.sqrt(dr * dr + dc * dc) / down_factor
    return out


def build_kernels(coords: np.ndarray, tile_px: float, npk: int = DEFAULT_NPK,
                  max_nodes: int = DEFAULT_MAX_NODES, n_init: int | str = "auto",
                  seed: int = OFFICIAL_KMEANS_SEED) -> KernelPlan:
    """Build a slide's :class:`KernelPlan` the way the official KAT pipeline does.

    Args:
        coords: [N, 2] (x, y) tile top-left positions, level-0 pixels (any order).
        tile_px: grid stride in the same units (``FeatureFileMeta.tile_size_level0_px``; float is fine).
        npk: tiles per kernel (official 144); sets the anchor count and, in the model, the Gaussian width.
        max_nodes: down-sampling threshold (official 4096). Use a large value to keep every tile.
        n_init: KMeans ``n_init``. ``"auto"`` (= 1 run for k-means++) is sklearn >= 1.4's default and what the
            official code gets on a current sklearn; pass 10 to reproduce anchors of checkpoints built with
            sklearn < 1.4 (2022-era).
        seed: KMeans ``random_state`` (official 9).
    """
    rc_all = grid_indices(coords, tile_px)
    df = down_sampling_factor(len(rc_all), max_nodes)
    kept = np.arange(len(rc_all)) if df == 1 else np.flatnonzero(_lattice_keep(rc_all, df))
    rc = rc_all[kept]
    order = np.lexsort((rc[:, 1], rc[:, 0]))          # official row-major order
    kept = kept[order].astype(np.int64)
    rc = np.ascontiguousarray(rc[order])
    anchors = select_anchors(rc, num_kernels(len(rc), npk), seed=seed, n_init=n_init)
    return KernelPlan(kept=kept, anchors=anchors, down_factor=int(df),
                      anchor_dist=anchor_distances(rc, anchors, df), grid_rc=rc)
