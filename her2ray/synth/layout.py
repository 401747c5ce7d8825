"""Slide-wide layout of a synthetic slide, at coarse resolution: where tissue is, and which cells carry the
planted class signal.

Why coarse: the layout must be known for every tile before any tile is drawn (tiles are rendered one
at a time, in any order), and it must stay small for a 50k x 50k slide. Tissue is a few noisy ellipses
("blobs") thresholded to a chosen area share, so every slide has about the same number of tissue tiles.
The class signal is assigned per *signal cell* (one 0.5 um/px, 256 px tile by default, i.e. 128 um):
exactly ``round(fraction * n)`` of the n tissue cells are marked, so the abundance of the pattern is a
precise function of the label instead of a noisy draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: fraction of tissue cells that carry the planted pattern, by HER2 class 0, 1+, 2+, 3+
SIGNAL_FRACTIONS = (0.0, 0.3, 0.6, 0.9)


@dataclass
class SlideLayout:
    width_px: int
    height_px: int
    #: level-0 px per coarse pixel
    coarse_px: float
    #: smooth tissue opacity in [0, 1] on the coarse grid [ch, cw]
    tissue: np.ndarray
    #: level-0 px per signal cell
    cell_px: float
    #: bool [n_cell_rows, n_cell_cols]: cells carrying the planted pattern
    marked: np.ndarray
    #: smooth share of epithelium vs stroma in [0, 1] on the coarse grid (low-frequency texture)
    cellularity: np.ndarray | None = None

    def _sample(self, grid: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Separable bilinear interpolation of a coarse grid at the pixel centres of a level-0 region."""
        r0, r1, fr = _interp_index(y0, h, self.coarse_px, grid.shape[0])
        c0, c1, fc = _interp_index(x0, w, self.coarse_px, grid.shape[1])
        rows = grid[r0] * (1.0 - fr)[:, None] + grid[r1] * fr[:, None]  # [h, cw]
        return rows[:, c0] * (1.0 - fc) + rows[:, c1] * fc

    def tissue_alpha(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Tissue opacity [h, w] of a level-0 region, soft at the edges."""
        a = self._sample(self.tissue, x0, y0, w, h)
        return np.clip((a - 0.5) * 3.0 + 0.5, 0.0, 1.0).astype(np.float32)

    def cellularity_map(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Epithelium share [h, w] in [0, 1] (0.5 everywhere when the layout has none)."""
        if self.cellularity is None:
            return np.full((h, w), 0.5, dtype=np.float32)
        return self._sample(self.cellularity, x0, y0, w, h).astype(np.float32)

    def region_has_tissue(self, x0: int, y0: int, w: int, h: int) -> bool:
        c0 = max(0, int(x0 / self.coarse_px) - 1)
        r0 = max(0, int(y0 / self.coarse_px) - 1)
        c1 = int((x0 + w) / self.coarse_px) + 2
        r1 = int((y0 + h) / self.coarse_px) + 2
        window = self.tissue[r0:r1, c0:c1]
        return window.size > 0 and float(window.max()) > 1.0 / 3.0 - 1e-6  # alpha > 0 somewhere

    def marked_mask(self, x0: int, y0: int, w: int, h: int) -> np.ndarray | None:
        """bool [h, w] of pixels in marked cells, or None when none of the region is marked."""
        if not self.marked.any():
            return None
        cols = np.minimum((np.arange(x0, x0 + w) // self.cell_px).astype(np.int64), self.marked.shape[1] - 1)
        rows = np.minimum((np.arange(y0, y0 + h) // self.cell_px).astype(np.int64), self.marked.shape[0] - 1)
        sub = self.marked[np.ix_(rows, cols)]
        return sub if sub.any() else None

    @property
    def tissue_share(self) -> float:
        return float((self.tissue > 0.5).mean())


def make_layout(width_px: int, height_px: int, *, seed: int, mpp: float, label: int | None,
                tissue_share: float = 0.45, cell_um: float = 128.0,
                signal_fractions=SIGNAL_FRACTIONS) -> SlideLayout:
    """Random tissue blobs covering ~``tissue_share`` of the slide, and the marked cells for ``label``."""
    from scipy import ndimage

    rng = np.random.default_rng([int(seed), 0x5EED])
    coarse_px = max(4.0, math.ceil(max(width_px, height_px) / 512))
    cw, ch = math.ceil(width_px / coarse_px), math.ceil(height_px / coarse_px)
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    field = np.full((ch, cw), -np.inf, dtype=np.float32)
    short = min(cw, ch)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0.2, 0.8) * cw, rng.uniform(0.2, 0.8) * ch
        rx, ry = rng.uniform(0.18, 0.4, size=2) * short
        t = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(t) + dy * np.sin(t)) / rx
        v = (-dx * np.sin(t) + dy * np.cos(t)) / ry
        field = np.maximum(field, 1.0 - np.sqrt(u * u + v * v))
    noise = ndimage.gaussian_filter(rng.standard_normal((ch, cw)).astype(np.float32), sigma=max(1.0, short * 0.04))
    field += 0.35 * noise / max(float(noise.std()), 1e-6)
    threshold = np.quantile(field, 1.0 - tissue_share)
    tissue = ndimage.gaussian_filter((field > threshold).astype(np.float32), sigma=1.0).astype(np.float32)

    cell_px = cell_um / mpp
    n_cc, n_cr = max(1, math.ceil(width_px / cell_px)), max(1, math.ceil(height_px / cell_px))
    marked = np.zeros((n_cr, n_cc), dtype=bool)
    if label is not None and signal_fractions[int(label)] > 0:
        cover = _cell_coverage(tissue, coarse_px, cell_px, n_cr, n_cc)
        candidates = np.flatnonzero(cover.ravel() >= 0.5)
        n_mark = int(round(signal_fractions[int(label)] * len(candidates)))
        chosen = rng.permutation(candidates)[:n_mark]
        marked.ravel()[chosen] = True
    # low-frequency texture: about 100 um patches of epithelium-rich vs stroma-rich tissue
    cell_noise = ndimage.gaussian_filter(rng.standard_normal((ch, cw)).astype(np.float32),
                                         sigma=max(1.0, 50.0 / mpp / coarse_px))
    cellularity = np.clip(0.5 + 0.35 * cell_noise / max(float(cell_noise.std()), 1e-6), 0.0, 1.0)
    return SlideLayout(int(width_px), int(height_px), float(coarse_px), tissue, float(cell_px), marked,
                       cellularity.astype(np.float32))


def _cell_coverage(tissue: np.ndarray, coarse_px: float, cell_px: float, n_rows: int, n_cols: int) -> np.ndarray:
    """Mean tissue opacity per signal cell (sampled at coarse-pixel centres)."""
    ch, cw = tissue.shape
    rows = np.minimum(((np.arange(ch) + 0.5) * coarse_px // cell_px).astype(np.int64), n_rows - 1)
    cols = np.minimum(((np.arange(cw) + 0.5) * coarse_px // cell_px).astype(np.int64), n_cols - 1)
    total = np.zeros((n_rows, n_cols))
    count = np.zeros((n_rows, n_cols))
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    np.add.at(total, (rr, cc), (tissue > 0.5))
    np.add.at(count, (rr, cc), 1)
    return total / np.maximum(count, 1)


def _interp_index(start: int, n: int, coarse_px: float, size: int):
    """Neighbouring coarse samples and weights for pixels start..start+n-1 (pixel centres)."""
    pos = np.clip((np.arange(start, start + n, dtype=np.float64) + 0.5) / coarse_px - 0.5, 0, size - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, size - 1)
    return i0, i1, (pos - i0).astype(np.float32)
