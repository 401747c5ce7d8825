"""Reinhard colour transfer (Reinhard et al. 2001) in l-alpha-beta space, statistics on tissue only.

lαβ is the decorrelated log-LMS space of the original paper (and HistomicsTK's ``reinhard``): two 3x3
matrices and a log, several times cheaper per tile than CIE L*a*b* (no gamma curves), which matters at
thousands of tiles per second. Plain Reinhard matches the mean/std of every pixel, so the amount of
white background in a tile drives the result; like Slideflow's "reinhard_mask" we compute statistics on
stained pixels and recolour only those, leaving background bit-identical (a blank or flat tile is
returned unchanged, never NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .od import OD_BACKGROUND, loose_tissue_mask, rgb_to_od

MIN_TISSUE_PIXELS = 200
MIN_TISSUE_FRACTION = 0.02
#: A tile whose tissue lightness (l) varies less than this is flat (black border, pen, saturation):
#: left unchanged. Also the floor of every source std, so a near-constant channel is not amplified.
MIN_SOURCE_STD = 0.01

_RGB2LMS = np.array([[0.3811, 0.5783, 0.0402],
                     [0.1967, 0.7244, 0.0782],
                     [0.0241, 0.1288, 0.8444]])
_LMS2LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]])
_RGB2LMS_T = _RGB2LMS.T.astype(np.float32)
_LMS2LAB_T = _LMS2LAB.T.astype(np.float32)
_LAB2LMS_T = np.linalg.inv(_LMS2LAB).T.astype(np.float32)
_LMS2RGB_T = np.linalg.inv(_RGB2LMS).T.astype(np.float32)


def rgb_to_lalphabeta(rgb: np.ndarray) -> np.ndarray:
    """uint8/float RGB [..., 3] (0..255) -> lαβ float32; +1 keeps log10 finite on black."""
    lms = (np.asarray(rgb, dtype=np.float32) + 1.0) @ _RGB2LMS_T
    return np.log10(lms) @ _LMS2LAB_T


def lalphabeta_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lalphabeta`, clipped and rounded to uint8."""
    rgb = np.power(np.float32(10.0), lab @ _LAB2LMS_T) @ _LMS2RGB_T - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ReinhardParams:
    """Mean and standard deviation of l, α, β over stained pixels."""

    means: np.ndarray  # [3]
    stds: np.ndarray   # [3]

    def as_tuple(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.concatenate([self.means, self.stds]))


def _tissue(rgb_pixels: np.ndarray, beta: float) -> np.ndarray | None:
    mask = loose_tissue_mask(rgb_to_od(rgb_pixels), beta)
    if mask.sum() < max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * len(mask)):
        return None
    return mask


def fit_reinhard(rgb: np.ndarray, beta: float = OD_BACKGROUND) -> ReinhardParams:
    """Target lαβ statistics of a reference H&E image (uint8 RGB [H,W,3] or [N,H,W,3])."""
    pixels = np.asarray(rgb).reshape(-1, 3)
    mask = _tissue(pixels, beta)
    if mask is None:
        raise ValueError("reference image has too little stained tissue to fit Reinhard statistics")
    lab = rgb_to_lalphabeta(pixels[mask]).astype(np.float64)
    return ReinhardParams(means=lab.mean(axis=0), stds=np.maximum(lab.std(axis=0), MIN_SOURCE_STD))


def normalize_tile(tile: np.ndarray, target: ReinhardParams, beta: float = OD_BACKGROUND) -> np.ndarray:
    """Match one uint8 tile's tissue lαβ mean/std to ``target``; unchanged if too little or flat tissue."""
    h, w, _ = tile.shape
    pixels = tile.reshape(-1, 3)
    mask = _tissue(pixels, beta)
    if mask is None:
        return tile.copy()
    lab = rgb_to_lalphabeta(pixels[mask])
    mu, sd = lab.mean(axis=0, dtype=np.float64), lab.std(axis=0, dtype=np.float64)
    if sd[0] < MIN_SOURCE_STD:
        return tile.copy()
    scale = (target.stds / np.maximum(sd, MIN_SOURCE_STD)).astype(np.float32)
    shift = (target.means - mu * scale).astype(np.float32)
    out = pixels.copy()
    out[mask] = lalphabeta_to_rgb(lab * scale + shift)
    return out.reshape(h, w, 3)
