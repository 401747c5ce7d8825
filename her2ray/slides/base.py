"""The one small interface every slide backend implements, so callers never import a slide library.

A backend (OpenSlide today; tiffslide, cuCIM or a DICOM reader later) subclasses ``SlideReader`` and
fills in a handful of primitives. The shared behaviour that must not differ between backends lives
here once: the MPP rule (a per-slide override wins; otherwise the slide's own value; otherwise a
``MissingMPPError`` that says how to fix it), white compositing, argument checks, context management
and the release of a staged remote copy on close.
"""

from __future__ import annotations

import abc
from typing import Callable, Mapping

import numpy as np

from ..errors import MissingMPPError, SlideReadError, SlideTooLargeError
from .mpp import mpp_disagreement, mpp_from_magnification, mpp_from_properties, objective_power
from .thumbnail import (DIRECT_THUMBNAIL_MAX_PX, bounded_thumbnail, describe_size, thumbnail_level,
                        thumbnail_size)

MPP_FIX_HINT = ("give the slide's microns per pixel in the manifest 'mpp' column, "
                "or pass --mpp-override (mpp_override=...)")
MAGNIFICATION_HINT = ("; or opt in to --mpp-from-magnification (10 um / objective power: {power:g}x -> "
                      "{mpp:g} um/px)")


class SlideReader(abc.ABC):
    """An open whole-slide image. Coordinates are level-0 pixels unless a name says otherwise.

    Subclasses implement ``_level_dimensions``, ``_level_downsamples``, ``_properties``,
    ``_native_mpp``, ``_read_rgba`` and ``_close``; optionally ``_thumbnail`` and ``_read_rgb``.
    """

    backend_name: str = "abstract"

    def __init__(self, path: str, local_path: str, mpp_override: float | None = None,
                 on_close: Callable[[], None] | None = None, mpp_from_magnification: bool = False):
        #: what the caller asked for (local path or URL): used in every error message
        self.path = str(path)
        #: the local file the backend reads (the staged copy for remote slides)
        self.local_path = str(local_path)
        if mpp_override is not None and not (float(mpp_override) > 0):
            raise SlideReadError(self.path, f"mpp override must be > 0, got {mpp_override!r}")
        self._mpp_override = float(mpp_override) if mpp_override is not None else None
        self._mpp_from_magnification = bool(mpp_from_magnification)
        self._on_close = on_close
        self._closed = False

    # ---- primitives a backend provides -------------------------------------------------------
    @abc.abstractmethod
    def _level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every level, level 0 first."""

    @abc.abstractmethod
    def _level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level relative to level 0."""

    @abc.abstractmethod
    def _properties(self) -> Mapping[str, str]:
        """Vendor/format key-value metadata."""

    @abc.abstractmethod
    def _native_mpp(self) -> float | None:
        """Level-0 microns per pixel recorded in the file, or None."""

    @abc.abstractmethod
    def _read_rgba(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """uint8 [h, w, 4] straight (not premultiplied) RGBA; transparent outside the slide."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release backend handles."""

    def _thumbnail(self, max_px: int) -> np.ndarray:
        """Default thumbnail of a level small enough to decode whole: read it, then resize."""
        from PIL import Image

        level = thumbnail_level(self.level_dimensions, max_px)
        w, h = self.level_dimensions[level]
        img = self.read_region(0, 0, level, w, h)
        return np.asarray(Image.fromarray(img).resize(thumbnail_size(self.dimensions, max_px), Image.Resampling.BOX))

    def _region_is_blank(self, level: int, x: int, y: int, w: int, h: int) -> bool:
        """True only when the backend *knows* the region holds no scanned pixels (sparse tiles), so a
        bounded-memory thumbnail can skip reading it; the default never skips."""
        return False

    # ---- public API ---------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return tuple(self.level_dimensions[0])  # type: ignore[return-value]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions()

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples()

    @property
    def properties(self) -> Mapping[str, str]:
        return self._properties()

    @property
    def native_mpp(self) -> float | None:
        """The MPP recorded in the file (ignores any override); None when absent."""
        return self._native_mpp()

    @property
    def objective_power(self) -> float | None:
        """Objective power the file records (20, 40, ...), or None."""
        return objective_power(self.properties)

    @property
    def mpp(self) -> float:
        """Level-0 microns per pixel: the override if given, else the file's; else, only when opted in
        (``mpp_from_magnification``), 10 um / objective power. Never a silent guess."""
        if self._mpp_override is not None:
            return self._mpp_override
        mpp = self._native_mpp()
        if mpp is not None:
            return mpp
        power = self.objective_power
        if power is not None and self._mpp_from_magnification:
            return mpp_from_magnification(power)
        hint = "" if power is None else MAGNIFICATION_HINT.format(power=power, mpp=mpp_from_magnification(power))
        raise MissingMPPError(self.path, f"the slide records no microns per pixel (MPP); {MPP_FIX_HINT}{hint}")

    @property
    def mpp_source(self) -> str:
        """'override', 'slide', 'magnification' or 'missing': where ``mpp`` comes from (for provenance)."""
        if self._mpp_override is not None:
            return "override"
        if self._native_mpp() is not None:
            return "slide"
        if self._mpp_from_magnification and self.objective_power is not None:
            return "magnification"
        return "missing"

    @property
    def mpp_warning(self) -> str | None:
        """Set when an override (the manifest's mpp) disagrees with the file's own MPP by more than 10 %."""
        return mpp_disagreement(self._mpp_override, self._native_mpp())

    def level_mpp(self, level: int) -> float:
        """Microns per pixel at ``level``."""
        return self.mpp * float(self.level_downsamples[level])

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """uint8 RGB [h, w, 3] of the region whose top-left is level-0 (x0, y0), size w x h *level* px.

        Transparent pixels (outside the scanned area or the slide) are composited onto white.
        """
        self._check_open()
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range 0..{self.level_count - 1}")
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {w}x{h}")
        return self._read_rgb(int(x0), int(y0), int(level), int(w), int(h))

    def _read_rgb(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB on white; a backend with a faster native RGB path overrides this."""
        return composite_on_white(self._read_rgba(x0, y0, level, w, h))

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """uint8 RGB thumbnail of the whole slide whose longer side is ``max_px`` (aspect kept).

        A slide whose best level for the thumbnail is too big to decode whole (a single-level or poorly
        pyramided scan) is reduced block by block in bounded memory (``thumbnail.bounded_thumbnail``).
        """
        self._check_open()
        if max_px <= 0:
            raise ValueError(f"max_px must be positive, got {max_px}")
        level = thumbnail_level(self.level_dimensions, int(max_px))
        w, h = self.level_dimensions[level]
        try:
            if w * h > DIRECT_THUMBNAIL_MAX_PX:
                return bounded_thumbnail(self, level, thumbnail_size(self.dimensions, int(max_px)))
            return self._thumbnail(int(max_px))
        except MemoryError:
            raise SlideTooLargeError(self.path, f"{describe_size(self)}: out of memory computing the "
                                                f"{max_px} px thumbnail") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        finally:
            if self._on_close is not None:
                self._on_close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: slide is closed")

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort for readers that were never closed
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, dimensions={self.dimensions}, "
                f"levels={self.level_count}, mpp={self._mpp_override or self._native_mpp()})")


class StaticMetadataReader(SlideReader):
    """A backend that reads its metadata once when opened: it sets ``_dims`` (level dimensions), ``_downs``
    (downsamples) and ``_props`` (properties, with ``openslide.*`` keys for the MPP / objective rules)."""

    _dims: tuple[tuple[int, int], ...]
    _downs: tuple[float, ...]
    _props: Mapping[str, str]

    def _level_dimensions(self):
        return self._dims

    def _level_downsamples(self):
        return self._downs

    def _properties(self) -> Mapping[str, str]:
        return self._props

    def _native_mpp(self) -> float | None:
        if not hasattr(self, "_mpp_native"):
            self._mpp_native = mpp_from_properties(self._props)
        return self._mpp_native


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA -> RGB on white; returns a view-free copy. Fast path when fully opaque."""
    if rgba.ndim != 3 or rgba.shape[2] not in (3, 4):
        raise ValueError(f"expected [h, w, 3|4] pixels, got shape {rgba.shape}")
    if rgba.shape[2] == 3:
        return np.ascontiguousarray(rgba, dtype=np.uint8)
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)[..., None]
    rgb = rgba[..., :3].astype(np.uint16)
    # out = rgb * a + 255 * (255 - a), divided by 255 with rounding
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)
