"""Which tiles of a tiled TIFF level hold no data (sparse tiles), whatever their compression.

Why: a scanner (or a converter) may write only the tiles that contain the scanned area and leave the
others empty (byte count 0); OpenSlide shows them transparent, i.e. white after compositing. Knowing
them lets a thumbnail of a huge single-level scan skip reading most of it. Only the tile index is read
(tifffile parses offsets, not pixels), and it serves every compression, JPEG 2000 and LZW included.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

#: OpenSlide vendors whose levels are plain tiled TIFF pages where an empty tile means "no pixels"
SPARSE_VENDORS = {"aperio", "generic-tiff"}


class TiffSparseIndex:
    """Per level, a boolean [rows, cols] map of tiles that have data."""

    def __init__(self, local_path: str, level_dimensions):
        import tifffile

        self._maps: dict[int, tuple[np.ndarray, int, int]] = {}
        with tifffile.TiffFile(local_path) as tif:
            pages = [p for p in tif.pages if getattr(p, "is_tiled", False)]
            for level, (w, h) in enumerate(level_dimensions):
                page = next((p for p in pages if (p.imagewidth, p.imagelength) == (w, h)), None)
                if page is None:
                    continue
                rows, cols = -(-h // page.tilelength), -(-w // page.tilewidth)
                counts = np.asarray(page.databytecounts)
                if counts.size != rows * cols:  # planar or odd layouts: no claim
                    continue
                self._maps[level] = (counts.reshape(rows, cols) > 0, page.tilewidth, page.tilelength)

    @classmethod
    def for_slide(cls, local_path: str, vendor: str | None, level_dimensions) -> "TiffSparseIndex | None":
        if vendor not in SPARSE_VENDORS:
            return None
        try:
            return cls(local_path, level_dimensions)
        except Exception as exc:  # noqa: BLE001 - no index: nothing is skipped, pixels are still right
            log.debug("no sparse-tile index for %s: %s", local_path, exc)
            return None

    def region_is_empty(self, level: int, x: int, y: int, w: int, h: int) -> bool:
        """True when every tile under the level-px region [x, x+w) x [y, y+h) is empty."""
        entry = self._maps.get(level)
        if entry is None:
            return False
        has_data, tw, th = entry
        r0, r1 = max(y, 0) // th, (y + h - 1) // th + 1
        c0, c1 = max(x, 0) // tw, (x + w - 1) // tw + 1
        return not has_data[r0:r1, c0:c1].any()
