"""The tile grid of a slide: non-overlapping tiles at the target MPP, kept where the mask shows tissue.

Coordinates are level-0 pixels of each tile's top-left corner, in row-major order (y, then x), so the
same slide and config always give the same tiles in the same order. The tissue fraction of a tile is
the exact area share of mask pixels under it (a summed-area table read with bilinear interpolation,
which is exact for a piecewise-constant mask), so it does not depend on where mask pixels fall.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import NoTissueError
from .config import TilingConfig
from .levels import choose_level
from .mask import slide_tissue_mask


@dataclass(eq=False)
class TileGrid:
    """Tiles of one slide. ``x``/``y``: int64 level-0 px (top-left); ``tissue_fraction``: float32."""

    x: np.ndarray
    y: np.ndarray
    tissue_fraction: np.ndarray
    level: int
    level_downsample: float
    tile_size_level0_px: float
    read_px: int
    tile_px: int
    target_mpp: float
    slide_mpp: float
    mask: np.ndarray | None = None
    #: (width, height) of level 0, px
    slide_dimensions: tuple[int, int] = (0, 0)
    #: grid cells before the tissue filter (n_cols * n_rows)
    n_grid_cells: int = 0
    #: um per mask pixel (mask resolution), 0 if no mask
    mask_mpp: float = 0.0
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def level_mpp(self) -> float:
        return self.slide_mpp * self.level_downsample

    @property
    def coords(self) -> np.ndarray:
        """[n, 2] int64 (x, y) level-0 px."""
        return np.stack([self.x, self.y], axis=1)

    @property
    def col(self) -> np.ndarray:
        """Grid column of each tile (0-based)."""
        return np.rint(self.x / self.tile_size_level0_px).astype(np.int64)

    @property
    def row(self) -> np.ndarray:
        """Grid row of each tile (0-based)."""
        return np.rint(self.y / self.tile_size_level0_px).astype(np.int64)

    def subset(self, indices) -> "TileGrid":
        idx = np.asarray(indices, dtype=np.int64)
        return replace(self, x=self.x[idx], y=self.y[idx], tissue_fraction=self.tissue_fraction[idx])

    def metadata(self) -> dict:
        """Settings that define the grid (JSON-friendly), for file metadata and provenance."""
        return {
            "level": int(self.level), "level_downsample": float(self.level_downsample),
            "level_mpp": float(self.level_mpp), "tile_size_level0_px": float(self.tile_size_level0_px),
            "read_px": int(self.read_px), "tile_px": int(self.tile_px), "target_mpp": float(self.target_mpp),
            "slide_mpp": float(self.slide_mpp), "slide_dimensions": [int(v) for v in self.slide_dimensions],
            "n_grid_cells": int(self.n_grid_cells), "n_tiles": len(self), "mask_mpp": float(self.mask_mpp),
            **self.extra,
        }

    def to_table(self):
        """pyarrow Table: x, y (int64 level-0 px), tissue_fraction (float32), level (int32), mpp (float64,
        the target um/px of the tiles); grid settings as JSON in schema metadata key b"her2ray_grid"."""
        import pyarrow as pa

        n = len(self)
        table = pa.table({
            "x": pa.array(self.x, pa.int64()),
            "y": pa.array(self.y, pa.int64()),
            "tissue_fraction": pa.array(self.tissue_fraction, pa.float32()),
            "level": pa.array(np.full(n, self.level, np.int32)),
            "mpp": pa.array(np.full(n, self.target_mpp, np.float64)),
        })
        return table.replace_schema_metadata({b"her2ray_grid": json.dumps(self.metadata()).encode()})


def tile_tissue_fractions(mask: np.ndarray, dimensions: tuple[int, int], x: np.ndarray, y: np.ndarray,
                          tile_size_level0_px: float) -> np.ndarray:
    """Area share of tissue under each level-0 square tile, from a mask covering the whole slide."""
    mask = np.asarray(mask, dtype=bool)
    mh, mw = mask.shape
    w0, h0 = dimensions
    sx, sy = mw / w0, mh / h0
    sat = np.zeros((mh + 1, mw + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)

    def integral(u, v):  # tissue area in [0,u) x [0,v), u = mask column, v = mask row (fractional)
        u = np.clip(u, 0, mw)
        v = np.clip(v, 0, mh)
        u0 = np.minimum(np.floor(u).astype(np.int64), mw - 1)
        v0 = np.minimum(np.floor(v).astype(np.int64), mh - 1)
        fu, fv = u - u0, v - v0
        return (sat[v0, u0] * (1 - fu) * (1 - fv) + sat[v0, u0 + 1] * fu * (1 - fv)
                + sat[v0 + 1, u0] * (1 - fu) * fv + sat[v0 + 1, u0 + 1] * fu * fv)

    xa = np.asarray(x, dtype=np.float64) * sx
    xb = (np.asarray(x, dtype=np.float64) + tile_size_level0_px) * sx
    ya = np.asarray(y, dtype=np.float64) * sy
    yb = (np.asarray(y, dtype=np.float64) + tile_size_level0_px) * sy
    area = integral(xb, yb) - integral(xa, yb) - integral(xb, ya) + integral(xa, ya)
    full = (xb - xa) * (yb - ya)
    return np.clip(area / np.maximum(full, 1e-12), 0.0, 1.0).astype(np.float32)


def grid_cells(dimensions: tuple[int, int], tile_size_level0_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-left level-0 px of every whole tile that fits the slide, row-major (y, then x)."""
    w0, h0 = dimensions
    n_cols = int(np.floor(w0 / tile_size_level0_px + 1e-9))
    n_rows = int(np.floor(h0 / tile_size_level0_px + 1e-9))
    cols = np.rint(np.arange(n_cols) * tile_size_level0_px).astype(np.int64)
    rows = np.rint(np.arange(n_rows) * tile_size_level0_px).astype(np.int64)
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    return xx.ravel(), yy.ravel()


def plan_tiles(reader, cfg: TilingConfig | None = None, *, keep_mask: bool = True) -> TileGrid:
    """Tissue tiles of an open slide (``SlideReader``) at ``cfg.target_mpp`` / ``cfg.tile_px``.

    Raises MissingMPPError (no MPP and no override) and NoTissueError (no tile reaches
    ``cfg.min_tissue``), both naming the slide.
    """
    cfg = cfg or TilingConfig()
    slide_mpp = reader.mpp
    choice = choose_level(reader.level_downsamples, slide_mpp, cfg.target_mpp, cfg.tile_px, cfg.mpp_tolerance,
                          snap=cfg.snap_read_px)
    ts = choice.tile_size_level0_px()
    dims = tuple(int(v) for v in reader.dimensions)
    mask, mask_mpp = slide_tissue_mask(reader, cfg)
    x, y = grid_cells(dims, ts)
    frac = tile_tissue_fractions(mask, dims, x, y, ts) if len(x) else np.zeros(0, np.float32)
    keep = frac >= cfg.min_tissue
    if not keep.any():
        raise NoTissueError(reader.path, f"no tile of {cfg.tile_px} px at {cfg.target_mpp} um/px has a tissue "
                                         f"fraction >= {cfg.min_tissue} ({len(x)} grid cells, tissue mask "
                                         f"covers {mask.mean():.1%} of the slide)")
    return TileGrid(
        x=x[keep], y=y[keep], tissue_fraction=frac[keep], level=choice.level,
        level_downsample=choice.level_downsample, tile_size_level0_px=float(ts), read_px=choice.read_px,
        tile_px=int(cfg.tile_px), target_mpp=float(cfg.target_mpp), slide_mpp=float(slide_mpp),
        mask=mask if keep_mask else None, slide_dimensions=dims, n_grid_cells=int(len(x)),
        mask_mpp=float(mask_mpp),
    )
