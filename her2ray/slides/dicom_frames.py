"""Fast path for DICOM WSI: serve the JPEG frames of a series' levels to the direct tile decoder.

Why: a DICOM WSI level is a grid of baseline-JPEG frames, exactly like a tiled JPEG TIFF page, so the
fast TIFF path (``tiff_tiles.TiffTileDecoder``: ``pread`` + libjpeg-turbo, several times cheaper than
OpenSlide's region painting) can decode them once it knows where each frame lies in the file. This module
finds that out from the DICOM headers (pydicom, headers only) and hands each qualifying level to a
``TiffTileDecoder`` built on the frame offsets. Qualifying: a VOLUME instance whose total pixel matrix
equals an OpenSlide level, JPEG Baseline transfer syntax (1.2.840.10008.1.2.4.50), 8-bit YCbCr
(``YBR_FULL``/``YBR_FULL_422``: the JPEG stream says YCbCr, so every decoder agrees), ``TILED_FULL``
frame order, one focal plane and optical path, no concatenation, one fragment per frame. Anything else
(and any doubt) stays with OpenSlide. Optional: without pydicom this module declines every slide.
The frames also feed the pipelined engine's compressed (``jpeg``) and DCT-scaled (``scaled``) routes, through
the same ``TiffTileDecoder`` accessors (``OpenSlideReader.jpeg_tiles``).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import OrderedDict

import numpy as np

from .tiff_tiles import CACHE_BYTES, TiffTileDecoder, _Level, fast_tiff_enabled

log = logging.getLogger(__name__)

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _SEQ_END = 0xE000FFFE, 0xE0DDFFFE


class _FramePage:
    """Stands in for a tifffile page: decodes one JPEG frame (tifffile's ``page.decode`` contract)."""

    jpegtables = None
    photometric = 6   # YCbCr-coded JPEG streams

    @staticmethod
    def decode(data: bytes, index: int, jpegtables=None):
        import imagecodecs

        return imagecodecs.jpeg8_decode(data)[None], None, None


def _fragments(fp, start: int) -> list[tuple[int, int]]:
    """(offset, length) of each pixel-data fragment after the basic offset table (encapsulated pixel data
    whose value starts at ``start``)."""
    fp.seek(start)
    out, first = [], True
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise ValueError("pixel data ends without a sequence delimiter")
        tag, length = struct.unpack("<II", head)
        if tag == _SEQ_END:
            return out
        if tag != _ITEM:
            raise ValueError(f"unexpected tag {tag:#010x} in pixel data")
        if not first:
            out.append((fp.tell(), length))
        first = False   # the first item is the basic offset table
        fp.seek(length, os.SEEK_CUR)


def _level_decoder(path: str, ds, level: int, width: int, height: int) -> TiffTileDecoder | None:
    """A one-level ``TiffTileDecoder`` over the instance's frames, or None when it does not qualify."""
    tw, th = int(ds.Columns), int(ds.Rows)
    n_across, n_down = -(-width // tw), -(-height // th)
    ok = (str(ds.file_meta.TransferSyntaxUID) == JPEG_BASELINE and int(ds.SamplesPerPixel) == 3
          and int(ds.BitsAllocated) == 8 and str(ds.PhotometricInterpretation) in ("YBR_FULL", "YBR_FULL_422")
          and str(ds.get("DimensionOrganizationType", "")) == "TILED_FULL" and "ConcatenationUID" not in ds
          and int(ds.get("TotalPixelMatrixFocalPlanes", 1)) == 1 and int(ds.get("NumberOfOpticalPaths", 1)) == 1
          and int(ds.get("NumberOfFrames", 1)) == n_across * n_down)
    if not ok:
        return None
    pixels = ds.get_item(0x7FE00010, keep_deferred=True)      # header only: where the value starts
    if pixels is None or pixels.length != _UNDEFINED_LENGTH or pixels.value_tell is None:
        return None   # not encapsulated (compressed) pixel data
    with open(path, "rb") as fp:
        frames = _fragments(fp, pixels.value_tell)
    if len(frames) != n_across * n_down:
        return None   # several fragments per frame: leave it to OpenSlide
    return _FrameDecoder(path, level, _Level(_FramePage(), width, height, tw, th, n_across,
                                             tuple(o for o, _ in frames), tuple(n for _, n in frames)))


class _FrameDecoder(TiffTileDecoder):
    """``TiffTileDecoder`` whose one level is a DICOM instance's frames (same reads, cache and checks)."""

    def __init__(self, path: str, level: int, lv: _Level, cache_bytes: int = CACHE_BYTES):  # noqa: D107
        self._tif = _NoTiff()
        self._fd = os.open(path, os.O_RDONLY)
        self._levels = {level: lv}
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        self._lock = threading.Lock()


class _NoTiff:
    def close(self) -> None:
        pass


class DicomFrameDecoder:
    """The fast path's interface (``supports``, ``read``, ``close``) over one decoder per DICOM level."""

    def __init__(self, per_level: dict[int, TiffTileDecoder]):
        self._per_level = per_level

    @classmethod
    def for_slide(cls, local_path: str, vendor: str | None, level_dimensions) -> "DicomFrameDecoder | None":
        if vendor != "dicom" or not fast_tiff_enabled():
            return None
        try:
            return cls._build(local_path, level_dimensions)
        except Exception as exc:  # noqa: BLE001 - any doubt: OpenSlide reads the slide
            log.debug("DICOM fast path unavailable for %s: %s", local_path, exc)
            return None

    @classmethod
    def _build(cls, local_path: str, level_dimensions) -> "DicomFrameDecoder | None":
        import pydicom

        folder = os.path.dirname(os.path.abspath(local_path))
        wanted = {tuple(d): k for k, d in enumerate(level_dimensions)}
        per_level: dict[int, TiffTileDecoder] = {}
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not name.lower().endswith(".dcm") or not os.path.isfile(path):
                continue
            ds = pydicom.dcmread(path, defer_size=1024)
            if "VOLUME" not in list(ds.get("ImageType", [])) or "TotalPixelMatrixColumns" not in ds:
                continue
            level = wanted.get((int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)))
            if level is None or level in per_level:
                continue
            dec = _level_decoder(path, ds, level, *level_dimensions[level])
            if dec is not None:
                per_level[level] = dec
        return cls(per_level) if per_level else None

    def supports(self, level: int) -> bool:
        return level in self._per_level

    def read(self, level: int, x: int, y: int, w: int, h: int, scale: int = 1) -> np.ndarray:
        return self._per_level[level].read(level, x, y, w, h, scale=scale)

    def __getattr__(self, name: str):
        """Every other per-level method of ``TiffTileDecoder`` (``method(level, ...)``, e.g. the compressed-
        tile accessors of the device-decode path) goes to that level's decoder."""
        if name.startswith("_") or not callable(getattr(TiffTileDecoder, name, None)):
            raise AttributeError(name)
        return lambda level, *args, **kwargs: getattr(self._per_level[level], name)(level, *args, **kwargs)

    def close(self) -> None:
        for dec in self._per_level.values():
            dec.close()
        self._per_level = {}
