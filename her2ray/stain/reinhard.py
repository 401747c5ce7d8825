"""Reinhard colour transfer (Reinhard et al. 2001) in CIE L*a*b*, statistics on tissue pixels only.

Plain Reinhard matches the mean/std of every pixel, so the amount of white background in a tile drives
the result; like Slideflow's "reinhard_mask" we compute the statistics on stained pixels and recolour
only those, leaving background bit-identical (a blank tile is returned unchanged, never NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.color import lab2rgb, rgb2lab

from .od import OD_BACKGROUND, loose_tissue_mask, rgb_to_od

MIN_TISSUE_PIXELS = 200
MIN_TISSUE_FRACTION = 0.02
STD_FLOOR = 1e-3


@dataclass(frozen=True)
class ReinhardParams:
    """Mean and standard deviation of L*, a*, b* over stained pixels."""

    means: np.ndarray  # [3]
    stds: np.ndarray   # [3]

    def as_tuple(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.concatenate([self.means, self.stds]))


def _tissue_lab(rgb_pixels: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray] | None:
    mask = loose_tissue_mask(rgb_to_od(rgb_pixels), beta)
    if mask.sum() < max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * len(mask)):
        return None
    lab = rgb2lab(rgb_pixels[mask][None].astype(np.float64) / 255.0)[0]
    return mask, lab


def fit_reinhard(rgb: np.ndarray, beta: float = OD_BACKGROUND) -> ReinhardParams:
    """Target L*a*b* statistics of a reference H&E image (uint8 RGB [H,W,3] or [N,H,W,3])."""
    found = _tissue_lab(np.asarray(rgb).reshape(-1, 3), beta)
    if found is None:
        raise ValueError("reference image has too little stained tissue to fit Reinhard statistics")
    lab = found[1]
    return ReinhardParams(means=lab.mean(axis=0), stds=np.maximum(lab.std(axis=0), STD_FLOOR))


def normalize_tile(tile: np.ndarray, target: ReinhardParams, beta: float = OD_BACKGROUND) -> np.ndarray:
    """Match one uint8 tile's tissue L*a*b* mean/std to ``target``; unchanged if it has too little tissue."""
    h, w, _ = tile.shape
    pixels = tile.reshape(-1, 3)
    found = _tissue_lab(pixels, beta)
    if found is None:
        return tile.copy()
    mask, lab = found
    mu, sd = lab.mean(axis=0), np.maximum(lab.std(axis=0), STD_FLOOR)
    lab = (lab - mu) / sd * target.stds + target.means
    lab[:, 0] = np.clip(lab[:, 0], 0.0, 100.0)
    rgb = lab2rgb(lab[None])[0]
    out = pixels.copy()
    out[mask] = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return out.reshape(h, w, 3)
