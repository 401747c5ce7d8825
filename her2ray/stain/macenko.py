"""Macenko stain normalisation (Macenko et al., ISBI 2009), numpy only, per tile.

Why our own ~100 lines instead of torchstain/staintools: torchstain's numpy Macenko fails on white or
faint tiles (empty pixel set -> NaN covariance / LinAlgError), flips at the +-pi angle wrap when an
eigenvector comes out with a negative sign, and fits its concentration percentiles on background pixels;
staintools needs SPAMS. The algorithm below follows the reference implementation (Io=240, beta=0.15,
alpha=1) with those three failure modes handled: too little tissue or a degenerate (single-stain) tile
is returned unchanged, eigenvector signs are fixed, and statistics use stained pixels only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .od import IO, OD_BACKGROUND, loose_tissue_mask, od_to_rgb, rgb_to_od, strict_tissue_mask

#: Fewer stained pixels than this (absolute, and as a fraction of the tile) -> tile left unchanged.
MIN_TISSUE_PIXELS = 200
MIN_TISSUE_FRACTION = 0.02
#: Stain vectors closer than this cosine similarity cannot be unmixed reliably (single-stain tile).
MAX_STAIN_COSINE = 0.995


@dataclass(frozen=True)
class MacenkoParams:
    """Fitted stain appearance: unit OD vectors of haematoxylin and eosin, and their 99th-pct concentration."""

    stain_matrix: np.ndarray   # [3, 2]: column 0 = haematoxylin, column 1 = eosin (unit OD vectors)
    max_concentrations: np.ndarray  # [2]

    def as_tuple(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.concatenate([self.stain_matrix.T.reshape(-1),
                                                       self.max_concentrations]))


def _fit_od(od_pixels: np.ndarray, alpha: float, beta: float) -> MacenkoParams | None:
    """Fit on OD pixels [n, 3]; None when the pixels do not support a two-stain fit."""
    n_total = od_pixels.shape[0]
    stained = od_pixels[strict_tissue_mask(od_pixels, beta)]
    if stained.shape[0] < max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * n_total):
        return None
    cov = np.cov(stained.T)
    if not np.all(np.isfinite(cov)):
        return None
    _, eigvecs = np.linalg.eigh(cov)              # ascending eigenvalues
    plane = eigvecs[:, 1:3][:, ::-1].copy()       # [3, 2]: largest first
    if plane[:, 0].sum() < 0:                      # OD data live in the positive octant: make the
        plane[:, 0] *= -1                          # main axis point there so angles stay in (-pi/2, pi/2)
    proj = stained @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin absorbs red most strongly -> larger first (R) OD component goes first
    h, e = (v_lo, v_hi) if v_lo[0] > v_hi[0] else (v_hi, v_lo)
    stains = np.stack([h, e], axis=1)
    stains = np.clip(stains, 1e-6, None)
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    if float(stains[:, 0] @ stains[:, 1]) > MAX_STAIN_COSINE:
        return None
    conc = np.linalg.pinv(stains) @ stained.T   # [2, n] least squares (lstsq is 30x slower here)
    max_c = np.percentile(conc, 99, axis=1)
    if not np.all(np.isfinite(max_c)) or np.any(max_c <= 1e-6):
        return None
    return MacenkoParams(stain_matrix=stains, max_concentrations=max_c)


def fit_macenko(rgb: np.ndarray, alpha: float = 1.0, beta: float = OD_BACKGROUND,
                io: float = IO) -> MacenkoParams:
    """Fit target stain parameters on a reference H&E image (uint8 RGB [H,W,3] or [N,H,W,3])."""
    od = rgb_to_od(np.asarray(rgb).reshape(-1, 3), io)
    params = _fit_od(od, alpha, beta)
    if params is None:
        raise ValueError("reference image has too little two-stain H&E tissue to fit Macenko parameters")
    return params


def normalize_tile(tile: np.ndarray, target: MacenkoParams, alpha: float = 1.0,
                   beta: float = OD_BACKGROUND, io: float = IO) -> np.ndarray:
    """Re-render one uint8 tile [H,W,3] with the target stains; unchanged if it cannot be fitted.

    Only pixels stained in some channel are recoloured; pure background keeps its exact values, so a
    tile's white areas do not turn grey (the reference implementation maps white to Io=240). The OD
    residual outside the fitted two-stain plane is added back unchanged: the reference implementation
    drops it, which shifts colours even when a tile is normalised to its own stains (blue +19/255 on
    the CMU tiles); keeping it makes "normalise to yourself" the identity.
    """
    h, w, _ = tile.shape
    od = rgb_to_od(tile.reshape(-1, 3), io)
    source = _fit_od(od, alpha, beta)
    if source is None:
        return tile.copy()
    mask = loose_tissue_mask(od, beta)
    od_t = od[mask].T                                                          # [3, m]
    conc = np.linalg.pinv(source.stain_matrix) @ od_t                            # [2, m]
    residual = od_t - source.stain_matrix @ conc      # what two stains cannot explain (JPEG, pen, ...)
    conc *= (target.max_concentrations / source.max_concentrations)[:, None]
    out = tile.reshape(-1, 3).copy()
    out[mask] = od_to_rgb((target.stain_matrix @ conc + residual).T, io)
    return out.reshape(h, w, 3)
