"""Tissue segmentation at thumbnail resolution: HSV saturation + Otsu, closing, hole filling, debris removal.

Why saturation: stained tissue (haematoxylin, eosin, DAB) is coloured, while glass background is white
or grey whatever its brightness; Otsu picks the split per slide, and a floor (``min_saturation``) keeps a
blank slide from being split into noise. Work is done on a thumbnail (a few um/px) because tile-level
decisions need only a tissue fraction, and a whole-slide mask at full resolution would not fit in memory.
"""

from __future__ import annotations

import math

import numpy as np

from .config import TilingConfig


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a uint8 RGB image (max-min over max; 0 for black)."""
    rgb = np.asarray(rgb)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]   # channel-wise max/min: ~5x faster than axis=-1
    mx = np.maximum(np.maximum(r, g), b).astype(np.float32)
    mn = np.minimum(np.minimum(r, g), b).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0)
    return sat.astype(np.float32)


def tissue_mask(thumbnail_rgb: np.ndarray, *, saturation_threshold: float | None = None,
                min_saturation: float = 0.05, closing_px: int = 2, min_area_px: int = 16,
                fill_holes: bool = True, max_hole_px: int | None = None) -> np.ndarray:
    """Boolean tissue mask of a uint8 RGB thumbnail (True = tissue), same height and width.

    ``saturation_threshold``: fixed threshold, or None for Otsu (never below ``min_saturation``).
    ``closing_px``: radius of the disk used to close small gaps; ``min_area_px``: smaller connected
    pieces are removed; ``max_hole_px``: holes up to this size are filled (None: all holes).
    """
    from skimage import morphology
    from skimage.filters import threshold_otsu

    img = np.asarray(thumbnail_rgb)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"expected an RGB image [h, w, 3], got shape {img.shape}")
    sat = saturation(img[..., :3])
    if saturation_threshold is None:
        thr = float(threshold_otsu(sat)) if float(sat.max()) > float(sat.min()) else 1.0
        thr = max(thr, float(min_saturation))
    else:
        thr = float(saturation_threshold)
    mask = sat > thr
    if closing_px > 0 and mask.any():
        mask = morphology.closing(mask, morphology.disk(int(closing_px))).astype(bool)
    if fill_holes and mask.any():
        if max_hole_px is None:
            from scipy import ndimage

            mask = ndimage.binary_fill_holes(mask)
        elif max_hole_px > 0:
            mask = morphology.remove_small_holes(mask, max_size=int(max_hole_px))
    if min_area_px > 1 and mask.any():
        mask = morphology.remove_small_objects(mask, max_size=int(min_area_px) - 1)
    return np.ascontiguousarray(mask, dtype=bool)


def mask_thumbnail_px(dimensions: tuple[int, int], slide_mpp: float, cfg: TilingConfig) -> int:
    """Longer side of the thumbnail that gives about ``cfg.mask_mpp`` um/px, within the px bounds."""
    longest_um = max(dimensions) * slide_mpp
    px = math.ceil(longest_um / cfg.mask_mpp)
    return int(min(max(px, cfg.mask_min_px), cfg.mask_max_px, max(dimensions)))


def slide_tissue_mask(reader, cfg: TilingConfig) -> tuple[np.ndarray, float]:
    """Tissue mask of a whole slide and its resolution in um per mask pixel."""
    w0, h0 = reader.dimensions
    slide_mpp = reader.mpp
    thumb = reader.thumbnail(mask_thumbnail_px((w0, h0), slide_mpp, cfg))
    mask_mpp = slide_mpp * max(w0 / thumb.shape[1], h0 / thumb.shape[0])
    px_area_um2 = mask_mpp * mask_mpp
    mask = tissue_mask(
        thumb,
        saturation_threshold=cfg.saturation_threshold,
        min_saturation=cfg.min_saturation,
        closing_px=int(round(cfg.closing_um / mask_mpp)),
        min_area_px=int(math.ceil(cfg.min_component_um2 / px_area_um2)),
        fill_holes=cfg.fill_holes,
        max_hole_px=None if cfg.max_hole_um2 is None else int(cfg.max_hole_um2 / px_area_um2),
    )
    return mask, mask_mpp


def save_mask_png(mask: np.ndarray, url: str) -> None:
    """Write the mask as a small black/white PNG (local path or any fsspec URL), atomically."""
    import io

    from PIL import Image

    from .. import storage

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(buf, format="PNG", optimize=True)
    storage.write_bytes_atomic(url, buf.getvalue())
