"""Backend registry and ``open_slide``: the single entry point for reading a slide.

Callers name a backend ("openslide" by default) and a location (local path, file:// or any fsspec URL);
a new backend (tiffslide, cuCIM, ...) is one ``register_backend`` call, with no change to callers.
Remote slides are staged into the local, size-bounded ``SlideCache`` first, because slide libraries
need a real local file; the staged copy stays pinned until the reader is closed.
"""

from __future__ import annotations

import os
from typing import Callable

from .. import storage
from ..errors import SlideError, SlideNotFoundError
from .base import SlideReader
from .cache import SlideCache, default_cache
from .formats import local_open_path

#: factory(path_for_messages, local_path, mpp_override=..., on_close=..., mpp_from_magnification=...)
#: -> SlideReader (a ``SlideReader`` subclass is such a factory)
BackendFactory = Callable[..., SlideReader]

_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``open_slide(..., backend=name)``."""
    if name in _BACKENDS and not replace:
        raise ValueError(f"slide backend {name!r} is already registered")
    _BACKENDS[name] = factory


def available_backends() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


def _factory(name: str) -> BackendFactory:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown slide backend {name!r}; registered: {', '.join(available_backends())}") from None


def open_slide(url_or_path, mpp_override: float | None = None, backend: str = "openslide",
               cache: SlideCache | None = None, mpp_from_magnification: bool = False) -> SlideReader:
    """Open a slide for reading; use as a context manager (``with open_slide(p) as s:``).

    ``url_or_path``: a local path, ``file://`` URL or any fsspec URL (``s3://bucket/key.svs``); it may name a
    slide folder (a DICOM series) or the index file of a multi-file format (``.mrxs``, ``.vms``).
    ``mpp_override``: level-0 um/px that wins over the file's own value (None: use the file's).
    ``mpp_from_magnification``: opt-in; a slide without MPP but with an objective power gets
    10 um / power (``mpp_source`` 'magnification').
    ``cache``: where remote slides are staged (default: ``default_cache()``, bounded by
    ``HER2RAY_SLIDE_CACHE_BYTES``).
    Raises SlideNotFoundError, SlideReadError (and MissingMPPError later, on ``.mpp``).
    """
    factory = _factory(backend)
    location = str(url_or_path)
    options = {"mpp_override": mpp_override, "mpp_from_magnification": bool(mpp_from_magnification)}
    if storage.is_local(location):
        local = storage.local_path(location)
        if not os.path.exists(local):
            raise SlideNotFoundError(location, "slide file not found")
        try:
            local = local_open_path(local)
        except SlideError as exc:
            raise type(exc)(location, str(exc).split(": ", 1)[-1]) from None
        return factory(location, local, **options)

    lease = (cache or default_cache()).stage(location)
    try:
        return factory(location, lease.local_path, on_close=lease.release, **options)
    except BaseException:
        lease.release()
        raise


def _register_builtin() -> None:
    from .openslide_backend import OpenSlideReader
    from .tiffslide_backend import TiffSlideReader

    register_backend("openslide", OpenSlideReader, replace=True)
    register_backend("tiffslide", TiffSlideReader, replace=True)


_register_builtin()
