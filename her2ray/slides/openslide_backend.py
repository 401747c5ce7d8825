"""OpenSlide backend: the default reader (Aperio, Hamamatsu, MIRAX, generic tiled TIFF, DICOM, ...).

OpenSlide's own exceptions are turned into her2ray's typed errors here, so callers see
``SlideReadError`` naming the file whether the file is unsupported, corrupt or truncated (a truncated
file often opens fine and only fails when a missing tile is decoded, hence the wrapping of reads).
openslide-python calls the C library through ctypes, which releases the GIL: reads from several
threads run in parallel. For tiled-JPEG TIFF formats (Aperio, generic TIFF) regions are decoded
directly from the file's tiles (``tiff_tiles``), which is several times cheaper and pixel-identical.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np

from ..errors import SlideNotFoundError, SlideReadError
from .base import StaticMetadataReader
from .dicom_frames import DicomFrameDecoder
from .sparse import TiffSparseIndex
from .tiff_tiles import TiffTileDecoder

log = logging.getLogger(__name__)


class OpenSlideReader(StaticMetadataReader):
    backend_name = "openslide"

    def __init__(self, path: str, local_path: str, mpp_override: float | None = None,
                 on_close: Callable[[], None] | None = None, mpp_from_magnification: bool = False):
        import openslide

        super().__init__(path, local_path, mpp_override, on_close, mpp_from_magnification)
        if not os.path.exists(local_path):
            raise SlideNotFoundError(self.path, "slide file not found")
        if not os.access(local_path, os.R_OK):
            raise SlideReadError(self.path, "slide file is not readable (permission denied)")
        try:
            self._slide = openslide.OpenSlide(local_path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideReadError(self.path, "unsupported or unrecognised slide format "
                                            "(OpenSlide cannot read it)") from None
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideReadError(self.path, f"cannot open slide (corrupt or truncated?): {exc}") from None
        # Cache immutable metadata: cheap to keep, avoids ctypes calls in hot loops.
        self._dims = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self._downs = tuple(float(d) for d in self._slide.level_downsamples)
        self._props = dict(self._slide.properties)
        vendor = self._props.get("openslide.vendor")
        self._fast = (DicomFrameDecoder.for_slide(local_path, vendor, self._dims) if vendor == "dicom"
                      else TiffTileDecoder.for_slide(local_path, vendor, self._dims))
        self._sparse: TiffSparseIndex | None | bool = False  # built on first use (huge thumbnails only)

    def _read_rgb(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        fast = self._fast
        if fast is not None and fast.supports(level):
            ds = self._downs[level]
            xl, yl = x0 / ds, y0 / ds
            if abs(xl - round(xl)) < 1e-6 and abs(yl - round(yl)) < 1e-6:  # no sub-pixel shift to render
                try:
                    return fast.read(level, round(xl), round(yl), w, h)
                except Exception as exc:  # noqa: BLE001 - e.g. a truncated tile: let OpenSlide report it
                    log.debug("%s: fast TIFF read failed (%s); using OpenSlide", self.path, exc)
        return super()._read_rgb(x0, y0, level, w, h)

    def jpeg_tiles(self, level: int) -> TiffTileDecoder | DicomFrameDecoder | None:
        """The level's compressed-tile source when its tiles are plain JPEG TIFF tiles or DICOM JPEG frames."""
        fast = self._fast
        return fast if isinstance(fast, (TiffTileDecoder, DicomFrameDecoder)) and fast.supports(level) else None

    def _read_rgba(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        import openslide

        try:
            img = self._slide.read_region((x0, y0), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(self.path, f"cannot decode region x={x0} y={y0} level={level} "
                                            f"{w}x{h} (corrupt or truncated?): {exc}") from None
        return np.asarray(img)

    def _region_is_blank(self, level: int, x: int, y: int, w: int, h: int) -> bool:
        if self._sparse is False:
            self._sparse = TiffSparseIndex.for_slide(self.local_path, self._props.get("openslide.vendor"), self._dims)
        return self._sparse is not None and self._sparse.region_is_empty(level, x, y, w, h)

    def _thumbnail(self, max_px: int) -> np.ndarray:
        import openslide

        try:
            img = self._slide.get_thumbnail((max_px, max_px))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(self.path, f"cannot decode thumbnail (corrupt or truncated?): {exc}") from None
        # get_thumbnail already composites on the background colour (white unless the file says so).
        return np.asarray(img.convert("RGB"))

    def _close(self) -> None:
        fast = getattr(self, "_fast", None)
        if fast is not None:
            fast.close()
            self._fast = None
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None
