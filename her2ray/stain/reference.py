"""Default target stain appearance, fitted once from real H&E and frozen here as constants.

Users do not have the team's test tiles, so the default target cannot be computed at run time. Source:
the five tissue tiles ``derived_CMU-1-Small-Region_L0_x{1024_y768,1280_y768,1024_y1792,1536_y2304,
768_y2560}_256.png`` cut at level 0 (0.499 um/px, 20x) from OpenSlide test slide
``Aperio/CMU-1-Small-Region.svs`` (CC0 1.0; see shared/data/README.md), fitted together with
``fit_macenko`` / ``fit_reinhard`` of this package (Io=240, beta=0.15, alpha=1).
``tests/test_stain.py`` refits them from those tiles and checks these numbers, and
:func:`refit_reference_constants` reproduces them.

Changing any constant changes the normaliser ``name`` (a hash of the parameters), so feature stores made
with the old and the new target are never mixed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .macenko import MacenkoParams, fit_macenko
from .reinhard import ReinhardParams, fit_reinhard

REFERENCE_TILES = (
    "derived_CMU-1-Small-Region_L0_x1024_y1792_256.png",
    "derived_CMU-1-Small-Region_L0_x1024_y768_256.png",
    "derived_CMU-1-Small-Region_L0_x1280_y768_256.png",
    "derived_CMU-1-Small-Region_L0_x1536_y2304_256.png",
    "derived_CMU-1-Small-Region_L0_x768_y2560_256.png",
)

DEFAULT_MACENKO = MacenkoParams(
    stain_matrix=np.array([[0.691286, 0.173462],
                           [0.635463, 0.912141],
                           [0.343962, 0.371363]]),
    max_concentrations=np.array([3.361713, 2.217247]),
)

DEFAULT_REINHARD = ReinhardParams(   # l, alpha, beta of Reinhard's log-LMS space (RGB in 0..255)
    means=np.array([3.47822, -0.077975, 0.02594]),
    stds=np.array([0.362073, 0.076601, 0.016617]),
)


def load_reference_tiles(tiles_dir: str | Path) -> np.ndarray:
    """The reference tiles as uint8 [5, 256, 256, 3] (needs the team's shared/data/tiles folder)."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(Path(tiles_dir) / name).convert("RGB")) for name in REFERENCE_TILES])


def refit_reference_constants(tiles_dir: str | Path) -> tuple[MacenkoParams, ReinhardParams]:
    """Recompute the default constants from the source tiles (to audit or regenerate them)."""
    tiles = load_reference_tiles(tiles_dir)
    return fit_macenko(tiles), fit_reinhard(tiles)
