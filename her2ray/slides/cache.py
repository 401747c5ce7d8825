"""Local, size-bounded scratch cache for remote slides (s3://, gs://, memory://, ...).

Why: slide libraries need a real local file, and a worker node may process thousands of slides, so
remote slides are downloaded once, kept while in use and evicted least-recently-used under a byte
budget. Several processes (Ray workers) on one node share the cache safely:

* a download goes to a temporary name under ``tmp/`` and is renamed into ``slides/`` only once its
  size matches the remote object, so a partial file is never served; a multi-file slide (DICOM series
  folder, MIRAX + data folder, VMS/VMU + images; see ``formats.slide_files``) is downloaded into a
  temporary folder and renamed as a whole, so a series is never served with a file missing;
* per-slide ``flock`` locks: exclusive while downloading (others wait, then reuse the file), shared
  while a reader has the slide open (eviction skips slides in use: OpenSlide may reopen the file);
* eviction runs under one cache-wide lock, oldest access time (file mtime, touched on use) first.

The budget is enforced before each download; with concurrent downloads or slides pinned by open
readers it can be exceeded briefly (logged), never deadlocked. Linux/macOS only (fcntl.flock).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

from .. import storage
from ..heartbeat import pid_alive
from ..errors import SlideNotFoundError, SlideReadError
from .formats import SlideFileSet, slide_files

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 20 * 1024**3
ENV_ROOT = "HER2RAY_SLIDE_CACHE"
ENV_BYTES = "HER2RAY_SLIDE_CACHE_BYTES"
_COPY_CHUNK = 16 * 1024**2
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass
class CacheEntry:
    path: str
    size_bytes: int
    last_used: float


class StagedSlide:
    """A lease on a staged local copy: the file is not evicted until ``release()``."""

    def __init__(self, url: str, local_path: str, lock_fd: int):
        self.url = url
        self.local_path = local_path
        self._fd: int | None = lock_fd
        self._guard = threading.Lock()

    def release(self) -> None:
        with self._guard:
            if self._fd is not None:
                os.close(self._fd)  # closing the descriptor drops its flock
                self._fd = None

    @property
    def released(self) -> bool:
        return self._fd is None

    def __enter__(self) -> "StagedSlide":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class SlideCache:
    """Stage remote slides into ``root`` under a budget of ``max_bytes``.

    Defaults: root = ``$HER2RAY_SLIDE_CACHE`` or ``<tmp>/her2ray-slide-cache-<uid>``;
    max_bytes = ``$HER2RAY_SLIDE_CACHE_BYTES`` or 20 GiB.
    """

    def __init__(self, root: str | None = None, max_bytes: int | None = None,
                 storage_options: dict | None = None):
        root = root or os.environ.get(ENV_ROOT) or os.path.join(
            tempfile.gettempdir(), f"her2ray-slide-cache-{os.getuid()}")
        self.root = os.path.abspath(root)
        self.max_bytes = int(max_bytes if max_bytes is not None else os.environ.get(ENV_BYTES, DEFAULT_CACHE_BYTES))
        if self.max_bytes <= 0:
            raise ValueError(f"slide cache budget must be positive, got {self.max_bytes}")
        self.storage_options = dict(storage_options or {})
        self.slides_dir = os.path.join(self.root, "slides")
        self.locks_dir = os.path.join(self.root, "locks")
        self.tmp_dir = os.path.join(self.root, "tmp")
        for d in (self.slides_dir, self.locks_dir, self.tmp_dir):
            os.makedirs(d, exist_ok=True)

    # ---- staging ------------------------------------------------------------------------------
    def stage(self, url: str) -> StagedSlide:
        """Return a lease on a complete local copy of ``url``, downloading it if needed.

        ``url`` may name one file, a DICOM series folder, or the index of a multi-file format (MIRAX,
        VMS/VMU, one ``.dcm`` of a series): then the whole set (``formats.slide_files``) is staged as one
        folder that appears only once every file has arrived, and the lease points at the file to open.
        """
        url = str(url)
        files = self._remote_files(url)
        size = files.size_bytes
        if size > self.max_bytes:
            raise SlideReadError(url, f"slide is {size} bytes, larger than the whole slide cache budget "
                                      f"({self.max_bytes} bytes); raise {ENV_BYTES} or pass a larger SlideCache")
        fingerprint = "\0".join(f"{f.name}\0{f.size}\0{f.version}" for f in files.files)
        key = hashlib.sha256(f"{url}\0{fingerprint}".encode()).hexdigest()[:32]
        name = _SAFE.sub("_", os.path.basename(url.rstrip("/")))[-80:] or "slide"
        final = os.path.join(self.slides_dir, f"{key}-{name}")
        lock_path = os.path.join(self.locks_dir, f"{key}.lock")
        opened = os.path.join(final, *files.open_name.split("/")) if files.multi_file else final

        for _ in range(100):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if not _complete(final, size):
                    fcntl.flock(fd, fcntl.LOCK_EX)  # others wait here while one process downloads
                    if not _complete(final, size):
                        self._download(url, files, final)
                    fcntl.flock(fd, fcntl.LOCK_SH)
                # flock conversion is not atomic: an evictor may have slipped in; then go round again.
                if _complete(final, size):
                    _touch(final)
                    return StagedSlide(url, opened, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise SlideReadError(url, "could not stage the slide: it kept being evicted (cache too small?)")

    def _remote_files(self, url: str) -> SlideFileSet:
        try:
            fs, path = storage.filesystem_for(url, self.storage_options)
            return slide_files(fs, path)
        except SlideNotFoundError:
            raise SlideNotFoundError(url, "slide not found on the remote store") from None
        except SlideReadError as exc:
            raise SlideReadError(url, str(exc).split(": ", 1)[-1]) from None
        except Exception as exc:  # noqa: BLE001 - network / auth errors become a typed slide error
            raise SlideReadError(url, f"cannot reach the remote slide: {type(exc).__name__}: {exc}") from None

    def _download(self, url: str, files: SlideFileSet, final: str) -> None:
        """Download to a temporary name (a folder for a file set), verify every size, then rename into place.

        The rename is the commit: ``final`` never exists with a partial file or an incomplete series.
        """
        self._make_room(files.size_bytes)
        tmp = os.path.join(self.tmp_dir, f"{os.path.basename(final)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
        t0 = time.perf_counter()
        try:
            fs, _ = storage.filesystem_for(url, self.storage_options)
            for f in files.files:
                dst_path = os.path.join(tmp, *f.name.split("/")) if files.multi_file else tmp
                os.makedirs(os.path.dirname(dst_path), exist_ok=True)
                with fs.open(posixpath.join(files.root, f.name), "rb") as src, open(dst_path, "wb") as dst:
                    shutil.copyfileobj(src, dst, _COPY_CHUNK)
                    dst.flush()
                    os.fsync(dst.fileno())
                got = os.path.getsize(dst_path)
                if got != f.size:
                    where = f" ({f.name})" if files.multi_file else ""
                    raise SlideReadError(url, f"incomplete download{where}: got {got} of {f.size} bytes")
            os.replace(tmp, final)
        except SlideReadError:
            raise
        except FileNotFoundError:
            raise SlideNotFoundError(url, "slide disappeared from the remote store during download") from None
        except Exception as exc:  # noqa: BLE001
            raise SlideReadError(url, f"download failed: {type(exc).__name__}: {exc}") from None
        finally:
            _remove(tmp)
        log.debug("staged %s (%d file(s), %d bytes) in %.2fs", url, len(files.files), files.size_bytes,
                  time.perf_counter() - t0)

    # ---- eviction -----------------------------------------------------------------------------
    def _make_room(self, incoming_bytes: int) -> None:
        """Evict least-recently-used slides not in use until ``incoming_bytes`` fits the budget."""
        fd = os.open(os.path.join(self.root, "evict.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_stale_tmp()
            total = self.size_bytes()
            for entry in self.entries():
                if total + incoming_bytes <= self.max_bytes:
                    break
                if self._evict(entry):
                    total -= entry.size_bytes
            if total + incoming_bytes > self.max_bytes:
                log.warning("slide cache %s over budget (%d + %d > %d bytes): the remaining slides are in use",
                            self.root, total, incoming_bytes, self.max_bytes)
        finally:
            os.close(fd)

    def _evict(self, entry: CacheEntry) -> bool:
        key = os.path.basename(entry.path).split("-", 1)[0]
        fd = os.open(os.path.join(self.locks_dir, f"{key}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # open in some reader (shared lock) or being downloaded
        try:
            if os.path.isdir(entry.path):  # a series: move it out of sight in one step, then delete
                doomed = os.path.join(self.tmp_dir, f"{os.path.basename(entry.path)}.{os.getpid()}.evict.part")
                os.replace(entry.path, doomed)
                _remove(doomed)
            else:
                os.unlink(entry.path)
            log.debug("evicted %s (%d bytes)", entry.path, entry.size_bytes)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def _remove_stale_tmp(self) -> None:
        """Delete partial downloads left by processes that died mid-download."""
        for name in os.listdir(self.tmp_dir):
            parts = name.rsplit(".", 3)
            try:
                pid = int(parts[-3])
            except (IndexError, ValueError):
                continue
            if not pid_alive(pid):
                _remove(os.path.join(self.tmp_dir, name))

    # ---- inspection ---------------------------------------------------------------------------
    def entries(self) -> list[CacheEntry]:
        """Complete cached slides, least recently used first."""
        out = []
        for name in os.listdir(self.slides_dir):
            p = os.path.join(self.slides_dir, name)
            try:
                st = os.stat(p)
                size = _tree_bytes(p) if os.path.isdir(p) else st.st_size
            except FileNotFoundError:
                continue
            out.append(CacheEntry(p, size, st.st_mtime))
        return sorted(out, key=lambda e: (e.last_used, e.path))

    def size_bytes(self) -> int:
        """Bytes held: complete slides plus downloads in progress."""
        tmp = 0
        for name in os.listdir(self.tmp_dir):
            try:
                tmp += _tree_bytes(os.path.join(self.tmp_dir, name))
            except FileNotFoundError:
                pass
        return sum(e.size_bytes for e in self.entries()) + tmp

    def clear(self) -> int:
        """Remove every cached slide not in use; returns the number removed."""
        return sum(self._evict(e) for e in self.entries())

    def __repr__(self) -> str:
        return f"SlideCache(root={self.root!r}, max_bytes={self.max_bytes})"


def _complete(path: str, size: int) -> bool:
    try:
        return _tree_bytes(path) == size
    except FileNotFoundError:
        return False


def _tree_bytes(path: str) -> int:
    """Size of a file, or of every file below a folder (a staged series)."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def _remove(path: str) -> None:
    """Delete a file or folder if present (no error when already gone)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


_DEFAULT: SlideCache | None = None
_DEFAULT_LOCK = threading.Lock()


def default_cache() -> SlideCache:
    """The process-wide cache configured by ``HER2RAY_SLIDE_CACHE`` / ``HER2RAY_SLIDE_CACHE_BYTES``."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = SlideCache()
        return _DEFAULT
