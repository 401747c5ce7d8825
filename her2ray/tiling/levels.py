"""Which pyramid level to read, and how many pixels of it make one tile.

Rule: read the coarsest level that is still at least as fine as the target (largest downsample whose
um/px <= target um/px, within a small relative tolerance so a 0.499 um/px scan counts as 0.5), then
resize down to the target. Reading a coarser level and upsampling would invent detail; reading a much
finer one wastes decode time. A slide coarser than the target everywhere is read at level 0 and
upsampled (logged), because refusing it would drop a scanned slide for a 10% resolution gap.

``snap=True`` applies the same tolerance to 2x, 4x and 8x the level's um/px: a 0.252 um/px 40x scan is then
read as exactly 512 px per 0.5 um/px tile (0.504 um/px, as a scanner's own 0.504 um/px level would be read
as-is), not 508 px. Exact power-of-two reads are what JPEG decoders can scale in the DCT domain (the
pipelined engine's ``scaled`` transport); odd sizes are not (measured in the README).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

log = logging.getLogger(__name__)

#: read sizes (x tile_px) that ``snap`` may round to
SNAP_FACTORS = (2, 4, 8)


@dataclass(frozen=True)
class LevelChoice:
    level: int
    level_downsample: float
    level_mpp: float
    #: tile edge in pixels at the read level (== tile_px when the level matches the target)
    read_px: int

    def tile_size_level0_px(self) -> float:
        return self.read_px * self.level_downsample


def choose_level(level_downsamples: Sequence[float], slide_mpp: float, target_mpp: float, tile_px: int,
                 tolerance: float = 0.02, snap: bool = False) -> LevelChoice:
    """Pick the read level and the read size for tiles of ``tile_px`` at ``target_mpp``."""
    if slide_mpp <= 0 or target_mpp <= 0:
        raise ValueError(f"mpp must be positive (slide {slide_mpp}, target {target_mpp})")
    limit = target_mpp * (1.0 + tolerance)
    level = 0
    for k, ds in enumerate(level_downsamples):
        if slide_mpp * ds <= limit and ds > level_downsamples[level]:
            level = k
    ds = float(level_downsamples[level])
    level_mpp = slide_mpp * ds
    snapped = [f for f in SNAP_FACTORS if abs(level_mpp * f / target_mpp - 1.0) <= tolerance] if snap else []
    if abs(level_mpp / target_mpp - 1.0) <= tolerance:
        read_px = int(tile_px)
    elif snapped:
        read_px = int(tile_px) * snapped[0]
    else:
        read_px = max(1, int(round(tile_px * target_mpp / level_mpp)))
        if level_mpp > limit:
            log.warning("slide resolution %.3f um/px is coarser than the target %.3f um/px: tiles are upsampled",
                        level_mpp, target_mpp)
    return LevelChoice(level=level, level_downsample=ds, level_mpp=level_mpp, read_px=read_px)
