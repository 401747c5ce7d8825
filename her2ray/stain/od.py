"""Optical density (Beer-Lambert) helpers and the tissue-pixel masks both normalisers rely on.

Stains absorb light multiplicatively, so in optical-density space (OD = -log(I / Io)) a pixel is a
*linear* mix of stain vectors. Everything stain-related is done in OD space; background (bright) pixels
carry no stain information and are masked out so a white tile never produces NaN or a colour cast.
"""

from __future__ import annotations

import numpy as np

#: Transmitted-light intensity of the Macenko reference implementation (slide background is ~240-255).
IO = 240.0
#: OD below this (in the tested channels) counts as background: 240 * exp(-0.15) ~ 206.
OD_BACKGROUND = 0.15


def rgb_to_od(rgb: np.ndarray, io: float = IO) -> np.ndarray:
    """uint8 RGB [..., 3] -> float64 OD [..., 3]; +1 avoids log(0) on black pixels."""
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / io)


def od_to_rgb(od: np.ndarray, io: float = IO) -> np.ndarray:
    """OD [..., 3] -> uint8 RGB, clipped and rounded (inverse of :func:`rgb_to_od`)."""
    rgb = io * np.exp(-np.asarray(od, dtype=np.float64)) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def strict_tissue_mask(od: np.ndarray, beta: float = OD_BACKGROUND) -> np.ndarray:
    """Pixels stained in *every* channel: what Macenko fits stain vectors on (no faint/transparent px)."""
    return np.all(od >= beta, axis=-1)


def loose_tissue_mask(od: np.ndarray, beta: float = OD_BACKGROUND) -> np.ndarray:
    """Pixels stained in *any* channel: what gets recoloured (everything else is left exactly as is)."""
    return np.any(od >= beta, axis=-1)


def as_batch(tiles: np.ndarray) -> tuple[np.ndarray, bool]:
    """Accept one tile [H,W,3] or a batch [N,H,W,3] of uint8; return (batch, was_single)."""
    arr = np.asarray(tiles)
    if arr.dtype != np.uint8:
        raise TypeError(f"stain normalisation expects uint8 RGB tiles, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return arr[None], True
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 tiles [N,H,W,3] (or one [H,W,3]), got shape {arr.shape}")
    return arr, False
