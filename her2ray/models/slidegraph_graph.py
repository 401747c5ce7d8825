"""SlideGraph+ slide graphs: tiles -> hybrid (space x feature) clusters -> nodes -> Delaunay edges; cached.

Method (Lu et al., Medical Image Analysis 2022, "SlideGraph+"; as in TIAToolbox's
``tiatoolbox.tools.graph``, which we read but do not copy):

1. Tiles within ``neighbour_radius_level0_px`` of each other get the distance
   ``1 - exp(-lambda_f * ||f_i - f_j||) * exp(-lambda_d * ||p_i - p_j||)`` (0 = identical, 1 = unrelated);
   farther pairs get 1. Features whose range over the slide is below ``feature_range_thresh`` are ignored.
2. Average-linkage hierarchical clustering on that distance, cut at ``lambda_h``: each cluster is a node.
3. Node feature = mean of its tiles' features (all features, not only the "significant" ones); node
   position = mean of its tiles' positions.
4. Delaunay triangulation of node positions; an edge is kept when its length is at most
   ``connectivity_level0_px``. Fewer than 4 nodes (or collinear nodes): all pairs within that distance.

Defaults are TIAToolbox's (lambda_d 3e-3, lambda_f 1e-3, lambda_h 0.8, connectivity 4000, radius 2000), all
distances in **level-0 pixels** (TIAToolbox applies them to the coordinates of its extraction resolution).

Deviation (documented): the exact clustering needs an n x n condensed distance matrix (n = tiles). Slides
with more than ``max_tiles`` tiles are first pooled onto a coarser grid (blocks of ``pool x pool`` tiles,
``pool = ceil(sqrt(n / max_tiles))``, mean features and positions), and the blocks are clustered. Every tile
still belongs to exactly one node (``tile_node``), which is what heatmaps need.

Cache: a graph depends only on the tiles' positions and features and on these parameters, so it is keyed by
the sha256 of exactly those bytes and stored beside the features (``<store>/graphs/<slide_id>.<key>.npz``).
A changed feature file or parameter gives another key: a stale graph can never be read.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from .. import storage

GRAPH_DIR = "graphs"


@dataclass(frozen=True)
class GraphParams:
    """Graph construction settings (TIAToolbox ``hybrid_clustered_graph`` defaults)."""

    lambda_d: float = 3.0e-3                 # spatial decay, per level-0 px
    lambda_f: float = 1.0e-3                 # feature decay, per feature-space unit
    lambda_h: float = 0.8                    # linkage cut on the 0..1 distance
    connectivity_level0_px: float = 4000.0   # longest Delaunay edge kept
    neighbour_radius_level0_px: float = 2000.0   # pairs farther apart are unrelated (distance 1)
    feature_range_thresh: float = 1.0e-4
    max_tiles: int = 6000                    # above this, tiles are pooled onto a coarser grid first

    def key(self) -> dict:
        return asdict(self)


@dataclass
class SlideGraph:
    """One slide's graph. ``tile_node[i]`` is the node of feature-file row i (all rows, file order)."""

    node_features: np.ndarray   # float32 [N, P]
    node_xy: np.ndarray         # float64 [N, 2] level-0 px (x, y)
    edge_index: np.ndarray      # int64 [2, E], both directions, no self loops
    tile_node: np.ndarray       # int64 [n_tiles]
    pool: int = 1               # grid pooling factor used before clustering (1 = none)

    @property
    def n_nodes(self) -> int:
        return int(len(self.node_features))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, node_features=self.node_features, node_xy=self.node_xy, edge_index=self.edge_index,
                 tile_node=self.tile_node, pool=np.array([self.pool]))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SlideGraph":
        with np.load(io.BytesIO(data)) as z:
            return cls(node_features=z["node_features"], node_xy=z["node_xy"], edge_index=z["edge_index"],
                       tile_node=z["tile_node"], pool=int(z["pool"][0]))


def hybrid_distance(xy: np.ndarray, feats: np.ndarray, params: GraphParams) -> np.ndarray:
    """Condensed (scipy ``pdist`` order) distance ``1 - exp(-lf*df) * exp(-ld*dp)``; 1 beyond the radius."""
    from scipy.spatial.distance import pdist

    keep = (feats.max(axis=0) - feats.min(axis=0)) > params.feature_range_thresh
    dp = pdist(xy.astype(np.float64))
    df = pdist(feats[:, keep].astype(np.float64)) if keep.any() else np.zeros_like(dp)
    dist = 1.0 - np.exp(-params.lambda_f * df) * np.exp(-params.lambda_d * dp)
    dist[dp > params.neighbour_radius_level0_px] = 1.0
    return dist


def cluster_tiles(xy: np.ndarray, feats: np.ndarray, params: GraphParams) -> np.ndarray:
    """Cluster label 0..N-1 per row: average linkage on :func:`hybrid_distance`, cut at ``lambda_h``."""
    n = len(xy)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    from scipy.cluster import hierarchy

    labels = hierarchy.fcluster(hierarchy.linkage(hybrid_distance(xy, feats, params), method="average"),
                                params.lambda_h, criterion="distance")
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int64)


def delaunay_edges(node_xy: np.ndarray, max_len: float) -> np.ndarray:
    """int64 [2, E]: Delaunay neighbours no farther apart than ``max_len``, both directions, sorted."""
    n = len(node_xy)
    pairs: set[tuple[int, int]] = set()
    tri = None
    if n >= 4:
        from scipy.spatial import Delaunay, QhullError

        try:
            tri = Delaunay(node_xy)
        except QhullError:   # collinear / degenerate layouts
            tri = None
    if tri is not None:
        for simplex in tri.simplices:
            for a in range(3):
                for b in range(a + 1, 3):
                    i, j = int(simplex[a]), int(simplex[b])
                    pairs.add((min(i, j), max(i, j)))
    else:
        pairs = {(i, j) for i in range(n) for j in range(i + 1, n)}
    keep = [(i, j) for i, j in sorted(pairs) if np.linalg.norm(node_xy[i] - node_xy[j]) <= max_len]
    if not keep:
        return np.zeros((2, 0), dtype=np.int64)
    e = np.array(keep, dtype=np.int64).T
    both = np.concatenate([e, e[::-1]], axis=1)
    order = np.lexsort((both[1], both[0]))
    return np.ascontiguousarray(both[:, order])


def _pool_grid(coords: np.ndarray, feats: np.ndarray, tile_px: float, pool: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean features/positions over ``pool x pool`` grid blocks; returns (xy, feats, block of each tile)."""
    cell = np.floor(np.asarray(coords, np.float64) / (float(tile_px) * pool)).astype(np.int64)
    _, block = np.unique(cell, axis=0, return_inverse=True)
    block = block.reshape(-1)
    nb = int(block.max()) + 1
    counts = np.bincount(block, minlength=nb).astype(np.float64)[:, None]
    xy = np.zeros((nb, 2))
    np.add.at(xy, block, coords.astype(np.float64))
    f = np.zeros((nb, feats.shape[1]))
    np.add.at(f, block, feats.astype(np.float64))
    return xy / counts, f / counts, block


def build_graph(coords: np.ndarray, feats: np.ndarray, tile_px: float, params: GraphParams = GraphParams()
                ) -> SlideGraph:
    """The slide graph of tiles at ``coords`` ([n, 2] level-0 px, x/y) with ``feats`` ([n, P])."""
    coords = np.asarray(coords, dtype=np.float64)
    feats = np.asarray(feats, dtype=np.float32)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(feats) or len(coords) == 0:
        raise ValueError(f"need coords [n, 2] and feats [n, P] with n >= 1; got {coords.shape}, {feats.shape}")
    n = len(coords)
    pool = 1 if n <= params.max_tiles else int(math.ceil(math.sqrt(n / params.max_tiles)))
    if pool > 1:
        xy, f, block = _pool_grid(coords, feats, tile_px, pool)
    else:
        xy, f, block = coords, feats.astype(np.float64), np.arange(n)
    unit_label = cluster_tiles(xy, f, params)
    tile_node = unit_label[block]
    n_nodes = int(tile_node.max()) + 1
    counts = np.bincount(tile_node, minlength=n_nodes).astype(np.float64)[:, None]
    node_f = np.zeros((n_nodes, feats.shape[1]))
    np.add.at(node_f, tile_node, feats.astype(np.float64))
    node_xy = np.zeros((n_nodes, 2))
    np.add.at(node_xy, tile_node, coords)
    node_xy /= counts
    return SlideGraph(node_features=(node_f / counts).astype(np.float32), node_xy=node_xy,
                      edge_index=delaunay_edges(node_xy, params.connectivity_level0_px),
                      tile_node=tile_node.astype(np.int64), pool=pool)


def graph_key(coords: np.ndarray, feats: np.ndarray, tile_px: float, params: GraphParams) -> str:
    """Content key: sha256 of the tile positions, features, grid stride and parameters."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(coords, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(feats, dtype=np.float32).tobytes())
    h.update(json.dumps({"tile_px": float(tile_px), **params.key()}, sort_keys=True).encode())
    return h.hexdigest()


def graph_cache_url(feature_file_url: str, slide_id: str, key: str) -> str:
    """``<store>/graphs/<slide_id>.<key[:16]>.npz`` for ``<store>/features/<slide_id>.parquet``."""
    folder = str(feature_file_url).rstrip("/").rsplit("/", 2)[0]
    return storage.join(folder, GRAPH_DIR, f"{slide_id}.{key[:16]}.npz")


def cached_graph(feature_file_url: str, slide_id: str, coords: np.ndarray, feats: np.ndarray, tile_px: float,
                 params: GraphParams, *, write: bool = True) -> tuple[SlideGraph, bool]:
    """(graph, was_cached): read the content-keyed cache beside the features or build (and store) it.

    A cache that cannot be written (read-only store) is not an error: the graph is just rebuilt next time.
    """
    url = graph_cache_url(feature_file_url, slide_id, graph_key(coords, feats, tile_px, params))
    try:
        graph = SlideGraph.from_bytes(storage.read_bytes(url))
        if len(graph.tile_node) == len(coords):
            return graph, True
    except (FileNotFoundError, OSError, ValueError, KeyError):
        pass
    graph = build_graph(coords, feats, tile_px, params)
    if write:
        try:
            storage.write_bytes_atomic(url, graph.to_bytes())
        except OSError:
            pass
    return graph, False
