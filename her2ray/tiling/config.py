"""Tiling settings: one validated object, from YAML (section ``tiling``) or CLI flags.

Physical units (um, um^2) are used for the tissue-mask parameters so that the same config segments a
20x and a 40x slide alike; they are converted to mask pixels once the mask resolution is known.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ..config import StageConfig


class TilingConfig(StageConfig):
    """How a slide becomes a grid of tiles. Defaults follow the KAT/PLIP setup: 256 px at 0.5 um/px."""

    target_mpp: float = Field(0.5, gt=0, description="um/px of the tiles given to the encoder")
    tile_px: int = Field(256, ge=8, le=8192, description="tile edge in pixels at target_mpp")
    min_tissue: float = Field(0.25, ge=0.0, le=1.0,
                              description="drop tiles whose tissue fraction (from the mask) is below this")
    mpp_tolerance: float = Field(0.02, ge=0.0, lt=0.5,
                                 description="relative tolerance: a level within it of target_mpp is read "
                                             "as-is (0.499 counts as 0.5) instead of being resized")
    snap_read_px: bool = Field(False, description="read exactly 2x/4x/8x tile_px when that is within "
                                                  "mpp_tolerance of target_mpp (a 0.252 um/px 40x scan gives "
                                                  "512 px reads, 0.504 um/px tiles): lets the pipelined "
                                                  "engine decode 40x scans at 1/2 in the DCT domain")

    # tissue mask (computed on a thumbnail)
    mask_mpp: float = Field(8.0, gt=0, description="um/px of the thumbnail the tissue mask is computed on")
    mask_min_px: int = Field(512, ge=16, description="longer side of the mask thumbnail, lower bound")
    mask_max_px: int = Field(4096, ge=16, description="longer side of the mask thumbnail, upper bound")
    saturation_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="HSV saturation threshold; None = Otsu on the thumbnail")
    min_saturation: float = Field(0.05, ge=0.0, le=1.0,
                                  description="floor for the Otsu threshold, keeps blank slides blank")
    closing_um: float = Field(4.0, ge=0.0, description="radius of the morphological closing")
    min_component_um2: float = Field(10_000.0, ge=0.0,
                                     description="tissue pieces smaller than this are dropped (debris)")
    fill_holes: bool = True
    max_hole_um2: float | None = Field(2_000.0, ge=0.0,
                                       description="holes up to this area are filled; None = all holes")

    @model_validator(mode="after")
    def _check_mask_bounds(self):
        if self.mask_min_px > self.mask_max_px:
            raise ValueError(f"mask_min_px ({self.mask_min_px}) > mask_max_px ({self.mask_max_px})")
        return self
