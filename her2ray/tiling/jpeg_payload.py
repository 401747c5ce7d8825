"""Compressed tiles for decoding on the encoder's device: which grid tiles are exactly k x k JPEG file tiles.

Why: on a 40x slide a 0.5 um/px tile is 512 level-0 px, i.e. 4 JPEG file tiles to decode and a 2x resize; on
the CPU that is ~2 ms per tile (design/readpath.md). When a grid tile starts on a file-tile corner at its read
level and spans exactly k x k whole file tiles (``read_px = k * file tile px``; inside the level; no sparse
tile), the reader only has to ``pread`` those k*k compressed tiles and ship them; the encoder's device decodes
(nvJPEG on a GPU), assembles them side by side and downscales. Slides that do not line up (Aperio's 240 px
tiles under a 256/512 px grid, sub-pixel level offsets, other formats) are read as pixels instead.

Payload format (one ``bytes`` per grid tile): ``uint32 n`` then ``n`` ``uint32`` stream lengths (little
endian), then the ``n = k*k`` complete JPEG streams, row-major.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .grid import TileGrid


@dataclass(frozen=True)
class JpegLayout:
    """How every grid tile of a slide maps to file tiles (same for all tiles of a slide)."""

    level: int
    file_tile_px: int
    k: int                      # file tiles across (and down) one grid tile
    rgb_coded: bool             # the JPEGs hold RGB, not YCbCr (Aperio); streams carry an Adobe marker

    def to_dict(self) -> dict:
        return {"level": self.level, "file_tile_px": self.file_tile_px, "k": self.k, "rgb_coded": self.rgb_coded}


def level_origin(grid: TileGrid) -> tuple[np.ndarray, np.ndarray] | None:
    """Each tile's origin in read-level pixels, or None when one is not a whole pixel."""
    ds = float(grid.level_downsample)
    xl, yl = grid.x / ds, grid.y / ds
    rx, ry = np.rint(xl), np.rint(yl)
    if np.abs(xl - rx).max(initial=0.0) > 1e-6 or np.abs(yl - ry).max(initial=0.0) > 1e-6:
        return None                                     # sub-pixel origin: only OpenSlide renders that
    return rx.astype(np.int64), ry.astype(np.int64)


def aligned_origins(grid: TileGrid, step: int, level_w: int, level_h: int
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """Each tile's read-level origin when every tile starts on a whole multiple of ``step`` pixels and its
    ``read_px`` square lies inside the ``level_w`` x ``level_h`` level, else None."""
    origin = level_origin(grid)
    if origin is None:
        return None
    xl, yl = origin
    rp = int(grid.read_px)
    if (xl % step).any() or (yl % step).any() or (xl < 0).any() or (yl < 0).any():
        return None
    if (xl + rp > level_w).any() or (yl + rp > level_h).any():
        return None
    return xl, yl


def tile_source(reader, grid: TileGrid, indices: Sequence[int]):
    """(the read level's compressed-tile source, origins of tiles ``indices``): what the compressed and the
    DCT-scaled readers both start from; an error naming the slide when the level cannot serve them."""
    src = reader.jpeg_tiles(grid.level)
    if src is None:
        raise ValueError(f"{reader.path}: level {grid.level} has no JPEG tiles")
    origin = level_origin(grid.subset(np.asarray(indices, dtype=np.int64)))
    if origin is None:
        raise ValueError(f"{reader.path}: tiles do not start on whole level pixels")
    return src, origin


def jpeg_layout(reader, grid: TileGrid) -> JpegLayout | None:
    """The layout when every tile of ``grid`` can be shipped as compressed file tiles, else None."""
    src = reader.jpeg_tiles(grid.level)
    if src is None or len(grid) == 0:
        return None
    tw, th, lw, lh = src.tile_grid(grid.level)
    rp = int(grid.read_px)
    if tw != th or rp % tw or rp < grid.tile_px:
        return None
    origin = aligned_origins(grid, tw, lw, lh)
    if origin is None:
        return None
    xl, yl = origin
    k = rp // tw
    counts = src.tile_byte_counts(grid.level)
    n_across = -(-lw // tw)
    for index in _file_tile_indices(xl // tw, yl // tw, k, n_across).ravel():
        if counts[index] == 0:
            return None                                 # a sparse (blank) file tile: OpenSlide paints it
    return JpegLayout(level=int(grid.level), file_tile_px=int(tw), k=int(k), rgb_coded=bool(src.rgb_coded(grid.level)))


def _file_tile_indices(c0: np.ndarray, r0: np.ndarray, k: int, n_across: int) -> np.ndarray:
    dy, dx = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    return (r0[:, None] + dy.ravel()[None, :]) * n_across + (c0[:, None] + dx.ravel()[None, :])


def jpeg_payloads(reader, grid: TileGrid, layout: JpegLayout, indices: Sequence[int]) -> list[bytes]:
    """Packed compressed tiles (see the module docstring) of the grid tiles ``indices``, in that order."""
    src, origin = tile_source(reader, grid, indices)
    ft, k = layout.file_tile_px, layout.k
    out = []
    for xl, yl in zip(*origin):
        c0, r0 = int(xl) // ft, int(yl) // ft
        out.append(pack_streams([src.jpeg_stream(layout.level, c0 + dx, r0 + dy)
                                 for dy in range(k) for dx in range(k)]))
    return out


def pack_streams(streams: Sequence[bytes]) -> bytes:
    head = struct.pack(f"<I{len(streams)}I", len(streams), *(len(s) for s in streams))
    return head + b"".join(streams)


def unpack_streams(payload) -> list[memoryview]:
    """The JPEG streams of one packed payload (views, no copies)."""
    view = memoryview(payload)
    (n,) = struct.unpack_from("<I", view, 0)
    lengths = struct.unpack_from(f"<{n}I", view, 4)
    pos = 4 + 4 * n
    out = []
    for length in lengths:
        out.append(view[pos:pos + length])
        pos += length
    if pos != len(view):
        raise ValueError(f"corrupt tile payload: {len(view)} bytes, streams end at {pos}")
    return out
