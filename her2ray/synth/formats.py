"""Synthetic slides in the archival TIFF flavours: Aperio or generic, JPEG 2000 / LZW / raw / JPEG tiles,
MPP in centimetres, inches or absent, and sparse huge single-level scans.

Why: the only real slide here is a JPEG Aperio SVS. Older archives hold Aperio JPEG 2000 (compression
33003: YCbCr components, 33005: RGB), LZW or uncompressed TIFFs, and scans with no pyramid at all; these
writers make small instances of each, with the same H&E-like painter as ``write_synthetic_slide``, so
the whole stack (OpenSlide detection, the fast-path fallback, MPP rules, thumbnails) is tested on real
files. Aperio slides carry an Aperio ImageDescription so OpenSlide detects them as ``aperio``.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .layout import make_layout
from .render import TilePainter

#: compression name -> (TIFF compression code, how tiles are encoded here)
COMPRESSIONS = {
    "jpeg": 7,
    "jpeg2000-ycbcr": 33003,   # Aperio: J2K codestream of Y, Cb, Cr components (no MCT)
    "jpeg2000-rgb": 33005,     # Aperio: J2K codestream of R, G, B components
    "jpeg2000": 34712,         # plain JPEG 2000 (OpenSlide's generic-tiff refuses it; tiffslide reads it)
    "lzw": 5,
    "none": 1,
}
_RES_UNITS = {"centimeter": 1e4, "inch": 25400.0}


def _ycbcr(rgb: np.ndarray) -> np.ndarray:
    """Full-range (JFIF) RGB -> YCbCr, the transform Aperio applies before 33003 encoding."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


def _encoder(compression: str, quality: int):
    import imagecodecs

    if compression == "jpeg":
        return lambda t: imagecodecs.jpeg8_encode(t, level=quality)
    if compression == "jpeg2000-ycbcr":
        return lambda t: imagecodecs.jpeg2k_encode(_ycbcr(t), level=0, codecformat="J2K", reversible=True,
                                                   mct=False)
    if compression in ("jpeg2000-rgb", "jpeg2000"):
        return lambda t: imagecodecs.jpeg2k_encode(t, level=0, codecformat="J2K", reversible=True)
    return None   # lzw / none: tifffile encodes the arrays itself


def aperio_description(width_px: int, height_px: int, tile_px: int, compression: str, mpp: float | None,
                       objective_power: float | None) -> str:
    """An Aperio ImageDescription (what OpenSlide's aperio detection looks for)."""
    fields = [f"Aperio Image Library v12.0.15\r\n{width_px}x{height_px} [0,0 {width_px}x{height_px}] "
              f"({tile_px}x{tile_px}) {compression.upper()} Q=70"]
    if objective_power is not None:
        fields.append(f"AppMag = {objective_power:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.4f}")
    fields.append("ScanScope ID = HER2RAY-SYNTH")
    return "|".join(fields)


def write_format_slide(path: str, compression: str = "jpeg2000-ycbcr", *, aperio: bool = True,
                       width_px: int = 1536, height_px: int = 1024, mpp: float | None = 0.5,
                       objective_power: float | None = 20, resolution_unit: str = "centimeter",
                       tile_px: int = 256, seed: int = 0, jpeg_quality: int = 90) -> str:
    """Write a one-level tiled TIFF slide in ``compression`` (see ``COMPRESSIONS``); returns ``path``.

    ``aperio``: an Aperio ImageDescription with ``MPP`` and ``AppMag`` (OpenSlide vendor ``aperio``);
    otherwise a generic tiled TIFF whose MPP lives in the resolution tags, in ``resolution_unit``
    ('centimeter' or 'inch'). ``mpp=None``: no MPP at all (``objective_power`` may still be written).
    """
    import tifffile

    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; choose one of {sorted(COMPRESSIONS)}")
    layout_mpp = mpp or 0.5
    painter = TilePainter(make_layout(width_px, height_px, seed=seed, mpp=layout_mpp, label=None),
                          mpp=layout_mpp, tile_px=tile_px, seed=seed)
    n_cols, n_rows = math.ceil(width_px / tile_px), math.ceil(height_px / tile_px)
    encode = _encoder(compression, jpeg_quality)

    def tiles():
        for r in range(n_rows):
            for c in range(n_cols):
                tile = painter(c, r)
                yield tile if encode is None else encode(tile)

    kwargs: dict = {"photometric": "rgb", "metadata": None}
    if aperio:
        kwargs["description"] = aperio_description(width_px, height_px, tile_px, compression, mpp,
                                                   objective_power)
    elif mpp is not None:
        per_unit = _RES_UNITS[resolution_unit] / mpp
        kwargs.update(resolution=(per_unit, per_unit), resolutionunit=resolution_unit.upper())
    if encode is None:
        kwargs.update(compression=None if compression == "none" else compression)
    else:
        kwargs.update(compression=COMPRESSIONS[compression])
        if compression == "jpeg":
            kwargs["photometric"] = "ycbcr"   # a JFIF stream: YCbCr inside, as scanners write it
            kwargs["subsampling"] = (2, 2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tifffile.imwrite(path, tiles(), shape=(height_px, width_px, 3), dtype=np.uint8, tile=(tile_px, tile_px),
                     **kwargs)
    return str(path)


def write_sparse_slide(path: str, width_px: int = 100_000, height_px: int = 100_000, *, mpp: float = 0.25,
                       tissue_box: tuple[int, int, int, int] = (20_480, 20_480, 2_048, 3_072),
                       tile_px: int = 512, seed: int = 0, jpeg_quality: int = 85) -> str:
    """A huge single-level JPEG TIFF of which only the tiles under ``tissue_box`` (x, y, w, h in level-0 px)
    are written; every other tile is empty (byte count 0), so a 100k x 100k px slide is a ~2 MB file.
    This is how an unpyramided archival scan of one small biopsy looks to a reader."""
    import imagecodecs
    import tifffile

    bx, by, bw, bh = tissue_box
    c0, r0 = bx // tile_px, by // tile_px
    c1, r1 = math.ceil((bx + bw) / tile_px), math.ceil((by + bh) / tile_px)
    layout = make_layout((c1 - c0) * tile_px, (r1 - r0) * tile_px, seed=seed, mpp=mpp, label=None,
                         tissue_share=0.7)
    painter = TilePainter(layout, mpp=mpp, tile_px=tile_px, seed=seed)
    n_cols, n_rows = math.ceil(width_px / tile_px), math.ceil(height_px / tile_px)

    def tiles():
        for r in range(n_rows):
            for c in range(n_cols):
                inside = c0 <= c < c1 and r0 <= r < r1
                yield imagecodecs.jpeg8_encode(painter(c - c0, r - r0), level=jpeg_quality) if inside else b""

    px_per_cm = 1e4 / mpp
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tifffile.imwrite(path, tiles(), shape=(height_px, width_px, 3), dtype=np.uint8, tile=(tile_px, tile_px),
                     photometric="ycbcr", subsampling=(2, 2), compression="jpeg", bigtiff=True, metadata=None,
                     resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    return str(path)
