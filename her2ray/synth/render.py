"""Paint one level-0 tile of a synthetic H&E-like slide.

Why this look: tests and the demo need slides whose tissue is found by the real tissue mask (pink/purple,
saturated) and whose planted class signal survives JPEG, pyramid downsampling and a random-weight
encoder. So the signal is large and colour-distinct at the tile scale: dense dark-brown clusters with
blue-black speckles covering about half of a marked cell's tissue, where normal tissue is pink stroma
with purple nuclei. Texture sizes are physical (um), so a 0.25 um/px slide shows at level 1 what a
0.5 um/px slide shows at level 0. Each tile draws its own random numbers from (seed, col, row), so tiles
can be rendered in any order with identical results.
"""

from __future__ import annotations

import numpy as np

from .layout import SlideLayout

BACKGROUND = np.array([242.0, 241.0, 244.0], dtype=np.float32)
STROMA = np.array([236.0, 164.0, 204.0], dtype=np.float32)
EPITHELIUM = np.array([208.0, 128.0, 186.0], dtype=np.float32)
NUCLEUS = np.array([92.0, 58.0, 142.0], dtype=np.float32)
CLUSTER = np.array([96.0, 58.0, 30.0], dtype=np.float32)
SPECKLE = np.array([28.0, 28.0, 52.0], dtype=np.float32)


class TilePainter:
    """Callable ``(col, row) -> uint8 [tile_px, tile_px, 3]`` for ``write_pyramidal_tiff``.

    Every pixel is a convex mix of a few colours (stroma, epithelium, nucleus, cluster, speckle) laid on
    glass by the tissue opacity; the mix weights are scalar maps, so a tile costs a few multiply-adds
    per channel instead of many full-colour passes.
    """

    def __init__(self, layout: SlideLayout, *, mpp: float, tile_px: int = 256, seed: int = 0,
                 signal_strength: float = 1.0, color_shift=(1.0, 1.0, 1.0)):
        self.layout = layout
        self.mpp = float(mpp)
        self.tile_px = int(tile_px)
        self.seed = int(seed)
        self.signal_strength = float(np.clip(signal_strength, 0.0, 1.0))
        shift = np.asarray(color_shift, dtype=np.float32).reshape(1, 3)
        colours = np.stack([STROMA, EPITHELIUM, NUCLEUS, CLUSTER, SPECKLE])
        # stain-like shift (scales the optical-density-ish distance from white), relative to glass
        self._delta = (255.0 - (255.0 - colours) * shift - BACKGROUND).astype(np.float32)  # [5, 3]

    def _noise(self, rng: np.random.Generator, feature_um: float) -> np.ndarray:
        """Smooth zero-mean unit-variance field [tp, tp] with blobs of about ``feature_um``."""
        from PIL import Image

        tp = self.tile_px
        n = max(2, int(round(tp * self.mpp / feature_um)))
        lattice = rng.standard_normal((n, n), dtype=np.float32)
        field = np.asarray(Image.fromarray(lattice).resize((tp, tp), Image.Resampling.BICUBIC))
        return (field - field.mean()) / max(float(field.std()), 1e-6)

    def __call__(self, col: int, row: int) -> np.ndarray:
        tp = self.tile_px
        x0, y0 = col * tp, row * tp
        rng = np.random.default_rng([self.seed, int(col), int(row), 0x711E])
        grain = rng.standard_normal((tp, tp), dtype=np.float32)
        if not self.layout.region_has_tissue(x0, y0, tp, tp):
            glass = BACKGROUND[None, None, :] + 1.5 * grain[..., None]
            return np.clip(glass, 0, 255).astype(np.uint8)

        alpha = self.layout.tissue_alpha(x0, y0, tp, tp)
        cellular = self.layout.cellularity_map(x0, y0, tp, tp)
        nuclei = np.clip((self._noise(rng, 7.0) - 1.3 + cellular) * 2.5, 0.0, 1.0)
        keep = 1.0 - nuclei
        weights = [(1.0 - cellular) * keep, cellular * keep, nuclei]  # stroma, epithelium, nucleus
        marked = self.layout.marked_mask(x0, y0, tp, tp)
        if marked is not None and self.signal_strength > 0:
            clusters = np.clip((self._noise(rng, 24.0) + 0.1) * 2.0, 0.0, 1.0) * marked
            w = clusters * self.signal_strength
            weights = [wi * (1.0 - w) for wi in weights]
            speckle = rng.random((tp, tp), dtype=np.float32) < 0.25
            weights += [np.where(speckle, 0.0, w), np.where(speckle, w, 0.0)]  # cluster, speckle
        grain *= 6.0 * alpha + 1.5 * (1.0 - alpha)
        # a few-term mix per pixel on contiguous planes (faster than a BLAS matmul of inner size 5)
        weights = [wi * alpha for wi in weights]  # tissue over glass
        out = np.empty((tp, tp, 3), dtype=np.float32)
        for c in range(3):
            plane = grain + BACKGROUND[c]
            for wi, delta in zip(weights, self._delta):
                plane += wi * delta[c]
            out[..., c] = plane
        return np.clip(out, 0, 255).astype(np.uint8)
