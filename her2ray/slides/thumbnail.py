"""Thumbnails of slides whose best level is too big to decode whole, in bounded memory.

Why: a thumbnail is normally read from a pyramid level a little larger than the thumbnail, but a
single-level or poorly pyramided scan (old archives; the real CMU-1-Small-Region is single-level) has only
level 0, and a 100k x 100k px level is 40 GB of RGBA: decoding it whole ended in ``MemoryError``. Here
the level is read in square regions of at most ``REGION_PX`` px, each reduced at once by an integer box
factor into a small intermediate image, which is finally resized to the requested size. Regions the
backend knows to be empty (sparse TIFF tiles with no data) are not read at all: they are white, as
OpenSlide shows them after compositing. Peak memory is one region (~50-70 MB RGB/RGBA) plus the
intermediate image (at most ~4x the thumbnail), whatever the slide size.

A level whose written (non-empty) part exceeds ``HER2RAY_MAX_THUMBNAIL_READ_PX`` (default 16 Gpx, about
a dense 126k x 126k px level: minutes of decoding) is refused up front with ``SlideTooLargeError``, whose
message names the slide's size and how to fix it (add a pyramid, or raise the limit).
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..errors import SlideTooLargeError

#: a thumbnail level with more pixels than this is reduced region by region (below: decoded whole)
DIRECT_THUMBNAIL_MAX_PX = 32 * 1024**2
#: edge of the square regions read one at a time, level px
REGION_PX = 4096
ENV_MAX_READ_PX = "HER2RAY_MAX_THUMBNAIL_READ_PX"
DEFAULT_MAX_READ_PX = 16 * 10**9


def thumbnail_level(level_dimensions, max_px: int) -> int:
    """The coarsest level whose longer side is still >= ``max_px`` (level 0 if none is)."""
    level = 0
    for k, (w, h) in enumerate(level_dimensions):
        if max(w, h) >= max_px:
            level = k
    return level


def thumbnail_size(dimensions, max_px: int) -> tuple[int, int]:
    """(width, height) of a thumbnail whose longer side is ``max_px``, aspect kept."""
    w0, h0 = dimensions
    scale = max_px / max(w0, h0)
    return max(1, round(w0 * scale)), max(1, round(h0 * scale))


def describe_size(reader) -> str:
    """'level 0 is 100000 x 100000 px (10.0 Gpx), 1 level': for error messages."""
    w, h = reader.dimensions
    n = reader.level_count
    return f"level 0 is {w} x {h} px ({w * h / 1e9:.1f} Gpx), {n} level{'s' if n != 1 else ''}"


def max_read_px() -> int:
    value = os.environ.get(ENV_MAX_READ_PX, "").strip()
    return int(float(value)) if value else DEFAULT_MAX_READ_PX


def _regions(w: int, h: int, step: int):
    for y in range(0, h, step):
        for x in range(0, w, step):
            yield x, y, min(step, w - x), min(step, h - y)


def box_reduce(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Mean of every ``factor`` x ``factor`` block (partial blocks at the right/bottom edge: the mean of
    their pixels), as uint8 [ceil(h/f), ceil(w/f), 3] (Pillow's ``Image.reduce``, in C)."""
    from PIL import Image

    if factor == 1:
        return np.ascontiguousarray(rgb)
    return np.asarray(Image.fromarray(rgb).reduce(int(factor)))


def bounded_thumbnail(reader, level: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB thumbnail of ``size`` (w, h) from ``level`` of ``reader``, reading region by region."""
    from PIL import Image

    w, h = reader.level_dimensions[level]
    ds = float(reader.level_downsamples[level])
    factor = max(1, min(w // size[0], h // size[1]))
    step = factor * max(1, REGION_PX // factor)
    todo = [r for r in _regions(w, h, step) if not reader._region_is_blank(level, *r)]
    to_read = sum(rw * rh for _, _, rw, rh in todo)
    limit = max_read_px()
    if to_read > limit:
        raise SlideTooLargeError(
            reader.path, f"{describe_size(reader)}: its thumbnail would have to decode {to_read / 1e9:.1f} Gpx "
                         f"of level {level} ({w} x {h} px), more than the limit of {limit / 1e9:.1f} Gpx. Give "
                         f"the slide a pyramid (e.g. `vips tiffsave in out.tif --tile --pyramid "
                         f"--compression jpeg`) or raise {ENV_MAX_READ_PX}")
    small = np.full((math.ceil(h / factor), math.ceil(w / factor), 3), 255, dtype=np.uint8)
    for x, y, rw, rh in todo:
        rgb = reader.read_region(round(x * ds), round(y * ds), level, rw, rh)
        part = box_reduce(rgb, factor)
        small[y // factor:y // factor + part.shape[0], x // factor:x // factor + part.shape[1]] = part
    return np.asarray(Image.fromarray(small).resize(tuple(size), Image.Resampling.BOX))
