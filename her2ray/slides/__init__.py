"""Whole-slide image reading behind one small interface (OpenSlide by default).

``open_slide(url_or_path, mpp_override=None, backend="openslide", cache=None)`` returns a
``SlideReader`` (context manager) for a local path, ``file://`` URL or any fsspec URL (a file, a DICOM
series folder, or a multi-file format's index); remote slides are staged into a local, size-bounded
``SlideCache`` as whole file sets.
"""

from .base import MPP_FIX_HINT, SlideReader, StaticMetadataReader, composite_on_white
from .cache import CacheEntry, SlideCache, StagedSlide, default_cache
from .mpp import mpp_from_properties
from .registry import available_backends, open_slide, register_backend

__all__ = [
    "CacheEntry", "MPP_FIX_HINT", "SlideCache", "SlideReader", "StagedSlide", "StaticMetadataReader",
    "available_backends", "composite_on_white", "default_cache", "mpp_from_properties", "open_slide",
    "register_backend",
]
