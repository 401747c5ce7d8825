"""Slide graphs for SlideGraph+ training and scoring: feature file -> cached graph -> packed batch.

Mirrors :class:`her2ray.models.bags.BagDataset` (same constructor knobs where they apply, same augmentation
rule and seeding) so the trainer treats both alike. Graphs come from the content-keyed cache beside the
features (:func:`her2ray.models.slidegraph_graph.cached_graph`) and are also kept in memory per process.

Augmentation is node dropout with the KAT tile-dropout rule: one ``t ~ U(0, aug_rate)`` per call, each node
survives if ``U(0, 1) > t`` (at least one always does); edges between survivors are kept and renumbered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..features.schema import read_slide_features
from .bags import augmentation_rng
from .slidegraph_graph import GraphParams, SlideGraph, cached_graph

UNKNOWN_LABEL = -1


def graph_params(settings: dict[str, Any] | None) -> GraphParams:
    """``GraphParams`` from a (possibly partial) settings dict; unknown keys raise ``TypeError``."""
    return GraphParams(**(settings or {}))


def load_graph(url: str, params: GraphParams, write_cache: bool = True) -> tuple[str, SlideGraph, bool]:
    """(slide_id, graph, was_cached) for one feature file."""
    slide = read_slide_features(url)
    graph, hit = cached_graph(url, slide.slide_id, slide.coords, slide.features,
                              float(slide.meta.tile_size_level0_px), params, write=write_cache)
    return slide.slide_id, graph, hit


def drop_nodes(graph: SlideGraph, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(node features, edge_index) of the subgraph on ``keep`` (bool [N]), nodes renumbered."""
    new_id = np.cumsum(keep) - 1
    src, dst = graph.edge_index
    ok = keep[src] & keep[dst]
    return graph.node_features[keep], np.stack([new_id[src[ok]], new_id[dst[ok]]]).astype(np.int64)


class GraphDataset(Dataset):
    """One item per feature file: ``features`` [N, P] node features, ``edge_index`` [2, E], ``label``,
    ``slide_id``, ``tile_node`` [n_tiles] (node of each feature-file row; only without augmentation)."""

    def __init__(self, feature_urls: Sequence[str], labels: Sequence[int] | None = None, aug_rate: float = 0.0,
                 seed: int = 0, graph: dict[str, Any] | None = None, write_cache: bool = True, **_: Any):
        self.feature_urls = [str(u) for u in feature_urls]
        if labels is not None and len(labels) != len(self.feature_urls):
            raise ValueError(f"{len(labels)} labels for {len(self.feature_urls)} feature files")
        if not 0.0 <= aug_rate < 1.0:
            raise ValueError(f"aug_rate must be in [0, 1), got {aug_rate}")
        self.labels = None if labels is None else [int(v) for v in labels]
        self.aug_rate, self.seed, self.epoch = float(aug_rate), int(seed), 0
        self.params, self.write_cache = graph_params(graph), bool(write_cache)
        self._graphs: dict[int, tuple[str, SlideGraph]] = {}
        self._draws: dict[tuple[int, int], int] = {}
        self.graphs_built = 0     # graphs built (not read from the cache) in this process

    def __len__(self) -> int:
        return len(self.feature_urls)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def graph(self, index: int) -> tuple[str, SlideGraph]:
        if index not in self._graphs:
            sid, g, hit = load_graph(self.feature_urls[index], self.params, self.write_cache)
            self.graphs_built += 0 if hit else 1
            self._graphs[index] = (sid, g)
        return self._graphs[index]

    def _rng(self, index: int) -> np.random.Generator:
        return augmentation_rng(self._draws, self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        sid, g = self.graph(index)
        feats, edges, tile_node = g.node_features, g.edge_index, g.tile_node
        if self.aug_rate > 0:
            rng = self._rng(index)
            threshold = rng.uniform(0.0, self.aug_rate)
            u = rng.uniform(0.0, 1.0, g.n_nodes)
            keep = u > threshold
            if not keep.any():
                keep[int(u.argmax())] = True
            feats, edges = drop_nodes(g, keep)
            tile_node = None
        return {"features": torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
                "edge_index": torch.from_numpy(np.ascontiguousarray(edges, dtype=np.int64)),
                "label": UNKNOWN_LABEL if self.labels is None else self.labels[index],
                "slide_id": sid, "tile_node": None if tile_node is None else torch.from_numpy(tile_node)}


def collate_graphs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pack graphs into one disjoint graph: ``features`` [N_total, P], ``edge_index`` [2, E] (offset),
    ``batch`` [N_total] graph index per node, ``num_graphs``, ``labels`` [B], ``slide_ids``."""
    if not items:
        raise ValueError("collate_graphs needs at least one item")
    feats, edges, owner, offset = [], [], [], 0
    for i, it in enumerate(items):
        n = int(it["features"].shape[0])
        feats.append(it["features"])
        edges.append(it["edge_index"] + offset)
        owner.append(torch.full((n,), i, dtype=torch.long))
        offset += n
    return {"features": torch.cat(feats), "edge_index": torch.cat(edges, dim=1), "batch": torch.cat(owner),
            "num_graphs": len(items), "labels": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
            "slide_ids": [it["slide_id"] for it in items]}


class GraphBag:
    """One slide ready for SlideGraph+ scoring: a batch of one graph plus the tile -> node map."""

    def __init__(self, graph: SlideGraph, device: str = "cpu"):
        self.graph = graph
        n = graph.n_nodes
        self.batch = {"features": torch.from_numpy(np.ascontiguousarray(graph.node_features)).to(device),
                      "edge_index": torch.from_numpy(np.ascontiguousarray(graph.edge_index)).to(device),
                      "batch": torch.zeros(n, dtype=torch.long, device=device), "num_graphs": 1}
        self.kept = np.arange(len(graph.tile_node), dtype=np.int64)   # every tile is in some node

    def as_batch(self) -> dict[str, Any]:
        return self.batch

    def tile_scores(self, logits: torch.Tensor, attn: dict[str, Any]) -> np.ndarray:
        """Per-tile relevance [n_tiles]: the score of the tile's node (``slidegraph.node_scores``)."""
        from .slidegraph import node_scores

        nodes = node_scores(attn["node"], self.batch["batch"], logits).cpu().numpy().astype(np.float64)
        return nodes[self.graph.tile_node]
