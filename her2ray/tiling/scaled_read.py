"""Tiles read at 1/2 (1/4, 1/8) in the DCT domain: a 40x slide gives 0.5 um/px tiles with no full-size decode.

Why: a 0.5 um/px tile of a 0.25 um/px slide is 512 level-0 px, i.e. ~4 JPEG file tiles decoded at full size
and a 2x box resize, 2-3.5 ms of CPU per tile (benchmarks/results/), and shipping the full-size pixels to the
encoder costs 4x the bytes. libjpeg-turbo can instead decode each file tile straight to 1/2 size (scaled
inverse DCT), which yields the 256 px tile directly: no resize anywhere.

It applies when a grid tile spans exactly ``s * tile_px`` read-level pixels (s = 2, 4, 8), starts on a multiple
of ``s`` and lies inside the level, and the level's file tiles are JPEG with sides divisible by ``s`` (any tile
size: Aperio's 240 px tiles qualify). Scans whose um/px is not exactly half the target (0.252 um/px reads
508 px) qualify with ``TilingConfig.snap_read_px``. Not for odd sizes: decoding at 1/2 and resizing 254 -> 256
px on the device gave per-tile cosines down to 0.9995 (508 px) and 0.997 (507 px) against the reference with
a random ViT-B/32, below the 0.9999 bar (README). Pixels differ from full decode + box resize by a fraction
of a grey level on average (the scaled IDCT is not a box filter); the engine records ``downscale: dct-1/s``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .grid import TileGrid
from .jpeg_payload import aligned_origins, tile_source


def dct_scale(reader, grid: TileGrid) -> int | None:
    """The DCT decode scale ``s`` that turns every tile of ``grid`` into ``tile_px`` pixels, or None."""
    if len(grid) == 0 or grid.read_px <= grid.tile_px or grid.read_px % grid.tile_px:
        return None
    s = int(grid.read_px) // int(grid.tile_px)
    src = reader.jpeg_tiles(grid.level)
    if src is None or not src.can_scale(grid.level, s):
        return None
    _, _, lw, lh = src.tile_grid(grid.level)
    return s if aligned_origins(grid, s, lw, lh) is not None else None


def scaled_tiles(reader, grid: TileGrid, scale: int, indices: Sequence[int]) -> np.ndarray:
    """uint8 ``[N, tile_px, tile_px, 3]`` tiles ``indices`` of ``grid``, decoded at 1/``scale``."""
    src, origin = tile_source(reader, grid, indices)
    tp, rp = int(grid.tile_px), int(grid.read_px)
    out = np.empty((len(origin[0]), tp, tp, 3), np.uint8)
    for i, (xl, yl) in enumerate(zip(*origin)):
        out[i] = src.read(grid.level, int(xl), int(yl), rp, rp, scale=scale)
    return out
