"""tiffslide backend: the example of "another backend is one small class" (``backend="tiffslide"``).

tiffslide (pure Python on tifffile + imagecodecs) reads the TIFF-based formats (Aperio SVS, generic
tiled TIFF, ...) and also TIFFs OpenSlide refuses, e.g. a generic tiled TIFF compressed with plain JPEG
2000 (compression 34712). It is optional: install ``tiffslide`` (it comes with the ``dev`` extras).
Its regions are padded with black outside the image, so the in-bounds part is read and white is put
around it here, as every her2ray backend must.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import SlideNotFoundError, SlideReadError
from .base import StaticMetadataReader


class TiffSlideReader(StaticMetadataReader):
    backend_name = "tiffslide"

    def __init__(self, path: str, local_path: str, mpp_override: float | None = None,
                 on_close: Callable[[], None] | None = None, mpp_from_magnification: bool = False):
        super().__init__(path, local_path, mpp_override, on_close, mpp_from_magnification)
        try:
            import tiffslide
        except ImportError:
            raise SlideReadError(self.path, "backend 'tiffslide' needs the tiffslide package "
                                            "(pip install tiffslide)") from None
        try:
            self._slide = tiffslide.TiffSlide(local_path)
        except FileNotFoundError:
            raise SlideNotFoundError(self.path, "slide file not found") from None
        except Exception as exc:  # noqa: BLE001 - tiffslide raises many kinds for unreadable files
            raise SlideReadError(self.path, f"tiffslide cannot open the slide: {exc}") from None
        self._dims = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self._downs = tuple(float(d) for d in self._slide.level_downsamples)
        # tiffslide.* keys mirror openslide.*: expose both so one MPP / objective rule serves every backend
        props = {k: str(v) for k, v in self._slide.properties.items() if v is not None}
        self._props = {**props, **{"openslide." + k[len("tiffslide."):]: v for k, v in props.items()
                                   if k.startswith("tiffslide.")}}

    def _read_rgba(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        out = np.zeros((h, w, 4), dtype=np.uint8)              # transparent outside the image
        ds = self._downs[level]
        lw, lh = self._dims[level]
        lx, ly = int(x0 // ds), int(y0 // ds)
        ax, ay = max(lx, 0), max(ly, 0)
        bx, by = min(lx + w, lw), min(ly + h, lh)
        if bx <= ax or by <= ay:
            return out
        try:
            rgb = self._slide.read_region((round(ax * ds), round(ay * ds)), level, (bx - ax, by - ay),
                                          as_array=True)
        except Exception as exc:  # noqa: BLE001
            raise SlideReadError(self.path, f"cannot decode region x={x0} y={y0} level={level} {w}x{h}: "
                                            f"{exc}") from None
        out[ay - ly:by - ly, ax - lx:bx - lx, :3] = rgb[..., :3]
        out[ay - ly:by - ly, ax - lx:bx - lx, 3] = 255
        return out

    def _close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None
