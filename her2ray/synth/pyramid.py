"""Write a pyramidal, tiled, JPEG-compressed TIFF that OpenSlide opens (its "generic-tiff" format).

Why streaming: a 50k x 50k RGB slide is 7.5 GB raw, so nothing here holds a whole level in memory.
Level 0 is produced one row of tiles at a time by a callback; while each row is written it is also
2x box-downsampled into the next level, which lives in RAM when small and in a disk-backed memmap
next to the output when large. Each level carries resolution tags (pixels per cm), so OpenSlide reports
``openslide.mpp-x``. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

#: a level larger than this (bytes) is buffered in a disk memmap instead of RAM
IN_MEMORY_LEVEL_BYTES = 256 * 1024**2

RenderTile = Callable[[int, int], np.ndarray]  # (col, row) -> uint8 [tile_px, tile_px, 3]


def pyramid_shapes(width_px: int, height_px: int, tile_px: int) -> list[tuple[int, int]]:
    """(width, height) of each level: halve until the level fits in one tile."""
    shapes = [(int(width_px), int(height_px))]
    while max(shapes[-1]) > tile_px:
        w, h = shapes[-1]
        shapes.append((math.ceil(w / 2), math.ceil(h / 2)))
    return shapes


def write_pyramidal_tiff(path: str, width_px: int, height_px: int, render_tile: RenderTile, *, mpp: float | None,
                         tile_px: int = 256, jpeg_quality: int = 90, description: str = "",
                         bigtiff: bool | None = None, workers: int | None = None, level_step: int = 2) -> str:
    """Write the slide whose level-0 tiles come from ``render_tile(col, row)``; returns ``path``.

    ``mpp=None`` writes no physical resolution (a slide without MPP, for error-path tests).
    ``bigtiff``: None = only when the raw level 0 exceeds 2 GiB (64-bit offsets; OpenSlide reads both).
    ``workers``: threads rendering the tiles of a row (numpy and PIL release the GIL); default: CPUs, <= 4.
    ``level_step``: downsample between stored levels, 2 (default: 1/2/4/...) or 4 (1/4/16/..., the pyramid of
    most 40x Aperio scans: no level at 2x, so 0.5 um/px tiles of a 0.25 um/px slide are read at level 0).
    """
    import tifffile

    if tile_px % 16:
        raise ValueError(f"tile_px must be a multiple of 16 (TIFF tiles), got {tile_px}")
    if level_step not in (2, 4):
        raise ValueError(f"level_step must be 2 or 4, got {level_step}")
    skip = level_step // 2                     # every 2x level is computed; every skip-th one is stored
    shapes = pyramid_shapes(width_px, height_px, tile_px)
    path = os.path.abspath(str(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if bigtiff is None:
        bigtiff = width_px * height_px * 3 > 2**31
    if workers is None:
        workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix=".her2ray-synth-", dir=folder) as tmp, \
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="her2ray-synth") as pool:
        part = os.path.join(tmp, "slide.tif")
        with tifffile.TiffWriter(part, bigtiff=bigtiff) as tw:
            source = None  # level k-1 pixels (array or memmap); None for level 0 (rendered)
            for k, (w, h) in enumerate(shapes):
                nxt = _alloc_level(shapes[k + 1], tmp, k + 1) if k + 1 < len(shapes) else None
                tiles = _level_tiles(w, h, tile_px, render_tile if source is None else None, source, nxt, pool)
                if k % skip:                   # computed only to feed the next level
                    for _ in tiles:
                        pass
                    source = nxt
                    continue
                if mpp is None:
                    res = {"resolution": (1, 1), "resolutionunit": "NONE"}
                else:
                    px_per_cm = 1e4 / (mpp * 2**k)
                    res = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
                tw.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=(tile_px, tile_px),
                         compression="jpeg", compressionargs={"level": int(jpeg_quality)}, photometric="rgb", **res,
                         subfiletype=0 if k == 0 else 1, metadata=None,
                         description=description if k == 0 else None)
                source = nxt
        os.replace(part, path)
    return path


def _alloc_level(shape: tuple[int, int], tmp: str, k: int) -> np.ndarray:
    w, h = shape
    if w * h * 3 <= IN_MEMORY_LEVEL_BYTES:
        return np.empty((h, w, 3), dtype=np.uint8)
    return np.memmap(os.path.join(tmp, f"level{k}.u8"), dtype=np.uint8, mode="w+", shape=(h, w, 3))


def _level_tiles(w: int, h: int, tp: int, render_tile: RenderTile | None, source: np.ndarray | None,
                 nxt: np.ndarray | None, pool: ThreadPoolExecutor):
    """Yield the level's tiles row by row (padded to whole tiles) and fill the next level on the way."""
    n_cols, n_rows = math.ceil(w / tp), math.ceil(h / tp)
    row = np.empty((tp, n_cols * tp, 3), dtype=np.uint8)
    for r in range(n_rows):
        if render_tile is not None:
            for c, tile in enumerate(pool.map(lambda c: render_tile(c, r), range(n_cols))):
                row[:, c * tp:(c + 1) * tp] = tile
        else:
            _copy_padded(source, r * tp, tp, row)
        # Downsample before yielding: the writer stops pulling after the level's last tile, so code
        # after the final yield would never run. Tiles are copies because the row buffer is reused.
        if nxt is not None:
            _downsample_into(row, r * tp, w, h, nxt)
        for c in range(n_cols):
            yield row[:, c * tp:(c + 1) * tp].copy()


def _copy_padded(source: np.ndarray, y0: int, tp: int, row: np.ndarray) -> None:
    """Copy rows [y0, y0+tp) of ``source`` into ``row``, replicating the last row/column as padding."""
    h, w = source.shape[:2]
    part = np.asarray(source[y0:min(y0 + tp, h)])
    n = part.shape[0]
    row[:n, :w] = part
    if w < row.shape[1]:
        row[:n, w:] = part[:, w - 1:w]
    if n < tp:
        row[n:] = row[n - 1:n]


def _downsample_into(row: np.ndarray, y0: int, w: int, h: int, nxt: np.ndarray) -> None:
    """2x2 box-average the valid part of a tile row into the next level at row y0 // 2."""
    valid_h = min(row.shape[0], h - y0)
    # an odd edge takes one padding row/column along (the tile row is always padded to even sizes)
    part = row[:valid_h + (valid_h % 2), :w + (w % 2)].astype(np.uint16)
    small = (part[0::2, 0::2] + part[1::2, 0::2] + part[0::2, 1::2] + part[1::2, 1::2] + 2) // 4
    ny0 = y0 // 2
    nh, nw = nxt.shape[:2]
    small = small[:max(0, nh - ny0), :nw]
    nxt[ny0:ny0 + small.shape[0], :small.shape[1]] = small.astype(np.uint8)
