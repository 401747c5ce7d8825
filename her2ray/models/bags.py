"""Slide bags for KAT/ABMIL training and scoring: feature file -> (features, anchor distances) -> padded batch.

Why: KAT needs, per slide, the kept tiles' features plus the anchor-to-tile distances of its
:class:`~her2ray.models.kernels.KernelPlan`. KMeans is by far the slowest part, so each slide's plan is built
once and cached in memory (the official loader re-read an N x N distance pickle on every item).
Augmentation is the official random tile dropout (kat.md 2.3): per call one ``t ~ U(0, aug_rate)``; each tile
survives if ``U(0, 1) > t``; survivors are compacted and the anchor-distance columns subset alike; anchors are
kept even if their own tile was dropped. Unlike the official loader at least one tile always survives.

Batches are padded to the batch's largest tile and kernel counts (not to fixed 4096 / 29 slots); padding is
exactly inert in the model, so this only saves work.

Workers: the plan cache lives in each process. Call :meth:`BagDataset.precompute_plans` before handing the
dataset to a multi-worker DataLoader so workers inherit the plans instead of each redoing KMeans.
Augmentation randomness is derived from ``(seed, epoch, index, draw count, DataLoader worker seed)``; call
:meth:`BagDataset.set_epoch` every epoch for reproducible, epoch-varying draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..features.schema import read_slide_features
from .kernels import DEFAULT_MAX_NODES, DEFAULT_NPK, OFFICIAL_KMEANS_SEED, KernelPlan, build_kernels

UNKNOWN_LABEL = -1


def augmentation_rng(draws: dict[tuple[int, int], int], seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one draw of slide ``index`` in ``epoch``: a function of (seed, epoch, index, draw number,
    DataLoader worker seed) only, so augmentation never depends on timing or on which process serves the slide."""
    key = (epoch, index)
    draw = draws.get(key, 0)
    draws[key] = draw + 1
    info = torch.utils.data.get_worker_info()
    worker_seed = 0 if info is None else int(info.seed) % (2 ** 63)
    return np.random.default_rng([seed, epoch, index, draw, worker_seed])


class BagDataset(Dataset):
    """One item per feature file.

    Args:
        feature_urls: per-slide feature files (``her2ray.features.schema`` format), local paths or URLs.
        labels: class index per slide, or None (items then carry ``label = -1``).
        npk: tiles per kernel (must match the model's ``npk``).
        max_nodes: grid down-sampling threshold (official 4096).
        aug_rate: tile-dropout strength; 0 disables augmentation (use 0 for validation / test).
        seed: augmentation seed.
        cache_features: also keep each slide's kept-tile features in memory (fast epochs, more RAM).
        n_init: KMeans ``n_init`` passed to :func:`build_kernels`.
        kmeans_seed: KMeans ``random_state`` (official 9).

    Item: dict with ``features`` float32 tensor [n, P], ``anchor_dist`` float32 tensor [m, n], ``label`` int,
    ``slide_id`` str, ``coords`` int64 tensor [n, 2] (x, y level-0 px of the tiles in ``features``) and
    ``down_factor`` int.
    """

    def __init__(self, feature_urls: Sequence[str], labels: Sequence[int] | None = None, npk: int = DEFAULT_NPK,
                 max_nodes: int = DEFAULT_MAX_NODES, aug_rate: float = 0.0, seed: int = 0,
                 cache_features: bool = False, n_init: int | str = "auto",
                 kmeans_seed: int = OFFICIAL_KMEANS_SEED):
        self.feature_urls = [str(u) for u in feature_urls]
        if labels is not None and len(labels) != len(self.feature_urls):
            raise ValueError(f"{len(labels)} labels for {len(self.feature_urls)} feature files")
        if not 0.0 <= aug_rate < 1.0:
            raise ValueError(f"aug_rate must be in [0, 1), got {aug_rate}")
        self.labels = None if labels is None else [int(v) for v in labels]
        self.npk, self.max_nodes, self.aug_rate, self.seed = npk, max_nodes, float(aug_rate), int(seed)
        self.cache_features, self.n_init, self.kmeans_seed = bool(cache_features), n_init, kmeans_seed
        self.epoch = 0
        self._plans: dict[int, tuple[str, KernelPlan, int]] = {}   # index -> (slide_id, plan, total tiles)
        self._features: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._draws: dict[tuple[int, int], int] = {}
        self.kmeans_runs = 0   # how many plans were built in this process (cache diagnostics)

    def __len__(self) -> int:
        return len(self.feature_urls)

    def set_epoch(self, epoch: int) -> None:
        """Make the augmentation of the coming epoch differ from (and not depend on) other epochs."""
        self.epoch = int(epoch)

    def _load(self, index: int) -> tuple[str, KernelPlan, np.ndarray, np.ndarray]:
        """(slide_id, plan, kept features float32 [n, P], kept coords int64 [n, 2]) for one slide."""
        cached_plan = self._plans.get(index)
        cached_feats = self._features.get(index)
        if cached_plan is not None and cached_feats is not None:
            return cached_plan[0], cached_plan[1], cached_feats[0], cached_feats[1]
        slide = read_slide_features(self.feature_urls[index])
        if cached_plan is None:
            plan = build_kernels(slide.coords, slide.meta.tile_size_level0_px, npk=self.npk,
                                 max_nodes=self.max_nodes, n_init=self.n_init, seed=self.kmeans_seed)
            self.kmeans_runs += 1
            cached_plan = self._plans[index] = (slide.slide_id, plan, len(slide.x))
        plan = cached_plan[1]
        if len(slide.x) != cached_plan[2]:
            raise RuntimeError(f"{self.feature_urls[index]}: tile count changed since its kernel plan was built")
        feats = np.ascontiguousarray(slide.features[plan.kept], dtype=np.float32)
        coords = np.ascontiguousarray(slide.coords[plan.kept], dtype=np.int64)
        if self.cache_features:
            self._features[index] = (feats, coords)
        return slide.slide_id, plan, feats, coords

    def plan(self, index: int) -> KernelPlan:
        """The slide's cached KernelPlan (built on first use)."""
        if index not in self._plans:
            self._load(index)
        return self._plans[index][1]

    def precompute_plans(self) -> None:
        """Build every slide's plan now (e.g. in the driver, before forking DataLoader workers)."""
        for i in range(len(self)):
            self.plan(i)

    def _rng(self, index: int) -> np.random.Generator:
        return augmentation_rng(self._draws, self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        slide_id, plan, feats, coords = self._load(index)
        dist = plan.anchor_dist
        if self.aug_rate > 0:
            rng = self._rng(index)
            threshold = rng.uniform(0.0, self.aug_rate)
            u = rng.uniform(0.0, 1.0, len(feats))
            keep = u > threshold
            if not keep.any():
                keep[int(u.argmax())] = True
            feats, coords, dist = feats[keep], coords[keep], dist[:, keep]
        return {
            "features": torch.from_numpy(np.ascontiguousarray(feats)),
            "anchor_dist": torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32)),
            "label": UNKNOWN_LABEL if self.labels is None else self.labels[index],
            "slide_id": slide_id,
            "coords": torch.from_numpy(np.ascontiguousarray(coords)),
            "down_factor": plan.down_factor,
        }


def collate_bags(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of :class:`BagDataset` items to the batch's max tile count n and kernel count m.

    Returns ``features`` [B, n, P] float32 (zeros in padding), ``anchor_dist`` [B, m, n] float32 (zeros in
    padding), ``tile_mask`` [B, n] bool, ``kernel_mask`` [B, m] bool (True = real), ``labels`` [B] long,
    ``slide_ids`` list[str], ``coords`` list of [n_i, 2] int64 tensors.
    """
    if not items:
        raise ValueError("collate_bags needs at least one item")
    b = len(items)
    n = max(int(it["features"].shape[0]) for it in items)
    m = max(int(it["anchor_dist"].shape[0]) for it in items)
    p = int(items[0]["features"].shape[1])
    features = torch.zeros(b, n, p, dtype=torch.float32)
    anchor_dist = torch.zeros(b, m, n, dtype=torch.float32)
    tile_mask = torch.zeros(b, n, dtype=torch.bool)
    kernel_mask = torch.zeros(b, m, dtype=torch.bool)
    for i, it in enumerate(items):
        ni, mi = int(it["features"].shape[0]), int(it["anchor_dist"].shape[0])
        if it["features"].shape[1] != p:
            raise ValueError(f"feature dims differ within a batch: {p} vs {it['features'].shape[1]} "
                             f"({it.get('slide_id')})")
        features[i, :ni] = it["features"]
        anchor_dist[i, :mi, :ni] = it["anchor_dist"]
        tile_mask[i, :ni] = True
        kernel_mask[i, :mi] = True
    return {
        "features": features,
        "anchor_dist": anchor_dist,
        "tile_mask": tile_mask,
        "kernel_mask": kernel_mask,
        "labels": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
        "slide_ids": [it["slide_id"] for it in items],
        "coords": [it["coords"] for it in items],
    }
