"""Preflight: check every manifest row's slide before Ray starts, so a bad path fails in seconds, not after an hour.

* local paths (and ``file://``) must exist and be readable REGULAR files. A FIFO, a socket, a device or a plain
  directory is rejected (opening a FIFO would block a worker forever). A directory (or an S3 prefix) is
  accepted only when the slide readers say it is one slide (``her2ray.slides.formats.is_slide_folder``: a DICOM
  WSI series, a MIRAX/VMS/VMU folder) or another registered check does (``register_directory_check``).
* ``s3://`` objects must exist: checked in bulk and in parallel (s3fs's event loop; one LIST per folder that
  holds many of the manifest's objects, else concurrent HEADs).
* other remote schemes: ``fs.exists`` in a thread pool.

Failed rows come back with a reason; the caller records them as failed and carries on with the rest.
"""

from __future__ import annotations

import os
import posixpath
import stat
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import storage

#: callables ``check(path) -> bool``: True when a slide reader can open this directory as one slide
_DIRECTORY_CHECKS: list[Callable[[str], bool]] = []
#: a folder holding at least this many of the manifest's objects is LISTed once instead of HEAD per object
LIST_THRESHOLD = 8
#: concurrent S3 requests in flight
S3_CONCURRENCY = 64


def register_directory_check(check: Callable[[str], bool]) -> None:
    """Accept directories that ``check`` recognises as one slide (e.g. a DICOM WSI series folder)."""
    if check not in _DIRECTORY_CHECKS:
        _DIRECTORY_CHECKS.append(check)


def _slide_folder(url: str) -> bool:
    """The slide readers' own rule (``her2ray.slides.formats.is_slide_folder``: DICOM series, MIRAX/VMS/VMU)."""
    from .slides.formats import is_slide_folder

    return is_slide_folder(url)


def directory_is_slide(path: str) -> bool:
    for check in (_slide_folder, *_DIRECTORY_CHECKS):
        try:
            if check(path):
                return True
        except Exception:  # noqa: BLE001 - a check that crashes does not accept the folder
            continue
    return False


def check_local(path: str) -> str | None:
    """None when ``path`` is a readable regular file (or an accepted slide folder), else the reason."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "file not found"
    except PermissionError:
        return "permission denied (cannot stat the file)"
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}"
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        if directory_is_slide(path):
            return None if os.access(path, os.R_OK | os.X_OK) else "slide folder is not readable"
        return "is a directory, not a slide file (no slide reader recognises this folder)"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if st.st_size == 0:
        return "is empty (0 bytes)"
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        return f"not readable: {exc.strerror or exc}"
    return None


def _s3_key(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


def check_s3(urls: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, str | None]:
    """``{url: None | reason}`` for ``s3://`` objects, in bulk: LIST folders with many wanted objects, HEAD the rest
    concurrently."""
    import asyncio

    from fsspec.asyn import sync

    if not urls:
        return {}
    fs, _ = storage.filesystem_for(urls[0], storage_options)
    result: dict[str, str | None] = {}
    by_dir: dict[str, list[str]] = defaultdict(list)
    for u in urls:
        by_dir[posixpath.dirname(_s3_key(u))].append(u)
    listed = {d: us for d, us in by_dir.items() if len(us) >= LIST_THRESHOLD}
    single = [u for d, us in by_dir.items() if d not in listed for u in us]
    limit = asyncio.Semaphore(S3_CONCURRENCY) if hasattr(fs, "_info") else None

    async def listing(folder: str):
        async with limit:
            try:
                entries = await fs._ls(folder, detail=True, refresh=True)
            except FileNotFoundError:
                entries = []
            except Exception as exc:  # noqa: BLE001
                return folder, exc
        return folder, {e["name"].rstrip("/"): e for e in entries}

    async def head(url: str):
        async with limit:
            try:
                return url, await fs._info(url)
            except FileNotFoundError:
                return url, None
            except Exception as exc:  # noqa: BLE001 - permissions, bad bucket...: a reason, not a crash
                return url, exc

    async def everything():
        return await asyncio.gather(*[listing(d) for d in listed], *[head(u) for u in single])

    if limit is None:   # not an async filesystem: plain threads
        with ThreadPoolExecutor(max_workers=16) as pool:
            return dict(zip(urls, pool.map(lambda u: None if fs.exists(u) else "object not found", urls)))
    for key, value in sync(fs.loop, everything):
        if key in listed:
            for u in listed[key]:
                result[u] = (f"cannot list {key}: {type(value).__name__}: {value}" if isinstance(value, Exception)
                             else _object_reason(value.get(_s3_key(u)), u))
        else:
            result[key] = (f"cannot check: {type(value).__name__}: {value}" if isinstance(value, Exception)
                           else _object_reason(value, key))
    return result


def _object_reason(entry: Mapping[str, Any] | None, url: str = "") -> str | None:
    if entry is None:
        return "object not found"
    if entry.get("type") == "directory":
        return None if url and directory_is_slide(url) else "is a prefix (folder), not an object or a slide folder"
    if int(entry.get("size") or 0) == 0:
        return "is empty (0 bytes)"
    return None


def check_remote(urls: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, str | None]:
    """Existence of non-S3 remote objects (gs://, http://, ...), a thread pool of ``fs.exists``."""
    def one(u: str) -> str | None:
        try:
            return None if storage.exists(u, storage_options) else "object not found"
        except Exception as exc:  # noqa: BLE001
            return f"cannot check: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(urls, pool.map(one, urls)))


@dataclass
class Preflight:
    """Rows that passed, rows that failed (``slide_id``, ``path``, ``reason``) and how long the check took."""

    ok: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def reasons(self) -> dict[str, str]:
        return {f["slide_id"]: f["reason"] for f in self.failed}


def check_paths(paths: Iterable[str], storage_options: Mapping[str, Any] | None = None,
                max_workers: int = 16) -> dict[str, str | None]:
    """``{path: None | reason}`` for any mix of local paths, file:// and remote URLs."""
    paths = list(dict.fromkeys(str(p) for p in paths))
    local = [p for p in paths if storage.is_local(p)]
    s3 = [p for p in paths if not storage.is_local(p) and p.lower().startswith(("s3://", "s3a://"))]
    other = [p for p in paths if p not in set(local) | set(s3)]
    out: dict[str, str | None] = {}
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        out.update(zip(local, pool.map(lambda p: check_local(storage.local_path(p)), local)))
    out.update(check_s3(s3, storage_options))
    out.update(check_remote(other, storage_options))
    return out


def preflight_rows(rows: Sequence[Mapping[str, Any]], storage_options: Mapping[str, Any] | None = None,
                   path_key: str = "path") -> Preflight:
    """Split manifest rows into those whose slide can be opened and those that cannot (with the reason)."""
    t0 = time.perf_counter()
    reasons = check_paths([str(r[path_key]) for r in rows], storage_options)
    result = Preflight()
    for r in rows:
        reason = reasons.get(str(r[path_key]))
        if reason is None:
            result.ok.append(dict(r))
        else:
            kind = "SlideNotFoundError" if "not found" in reason else "SlideReadError"
            result.failed.append({"slide_id": r.get("slide_id"), "path": str(r[path_key]),
                                  "reason": f"{kind}: {r[path_key]}: {reason} (preflight)"})
    result.seconds = time.perf_counter() - t0
    return result


__all__ = ["LIST_THRESHOLD", "Preflight", "check_local", "check_paths", "check_remote", "check_s3",
           "directory_is_slide", "preflight_rows", "register_directory_check"]
