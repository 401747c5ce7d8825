"""One place that turns a URL (local path, file://, s3://, any fsspec protocol) into a filesystem and path.

Writes are atomic: a reader never sees a partial file. Locally we write a temporary sibling and rename;
on object stores a PUT (or a completed multipart upload) is atomic by the store's own semantics.
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
import uuid
from typing import Any, Mapping

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

LOCAL_PROTOCOLS = {"file", "local"}


def filesystem_for(url: str, storage_options: Mapping[str, Any] | None = None):
    """Return ``(fs, path)`` for ``url``; S3 settings come from the standard AWS env/config."""
    fs, path = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    return fs, path


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs."""
    url = str(url)
    return "://" not in url or url.split("://", 1)[0] in LOCAL_PROTOCOLS


def local_path(url: str) -> str:
    """Plain filesystem path of a local URL (``file:///a/b`` -> ``/a/b``)."""
    url = str(url)
    return url.split("://", 1)[1] if url.startswith("file://") else url


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the scheme (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    base = str(base)
    if is_local(base):
        return os.path.join(local_path(base), *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = filesystem_for(url, storage_options)
    return fs.exists(path)


def makedirs(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Create a folder locally; a no-op on object stores (prefixes need no creation)."""
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)


def list_files(url: str, suffix: str = "", storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Full URLs of the files directly under the folder ``url`` whose names end with ``suffix``."""
    fs, path = filesystem_for(url, storage_options)
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - not every filesystem caches listings
        pass
    if not fs.exists(path):
        return []
    names = [p for p in fs.ls(path, detail=False) if p.rstrip("/").endswith(suffix)]
    return sorted(_with_scheme(url, p) for p in names)


def _with_scheme(reference_url: str, path: str) -> str:
    if is_local(reference_url):
        return path
    scheme = str(reference_url).split("://", 1)[0]
    return f"{scheme}://{path}"


def write_bytes_atomic(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` so the file appears complete or not at all."""
    if is_local(url):
        path = local_path(url)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())     # mkstemp makes 0600; outputs follow the umask
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs, path = filesystem_for(url, storage_options)
    fs.pipe_file(path, data)  # one PUT (or one multipart upload): visible only once complete


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``), else set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    fs, path = filesystem_for(url, storage_options)
    with fs.open(path, "rb") as fh:
        return fh.read()


def write_text_atomic(url: str, text: str, storage_options: Mapping[str, Any] | None = None) -> None:
    write_bytes_atomic(url, text.encode("utf-8"), storage_options)


def read_text(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    return read_bytes(url, storage_options).decode("utf-8")


def write_parquet_atomic(table: pa.Table, url: str, storage_options: Mapping[str, Any] | None = None,
                         **write_kwargs: Any) -> None:
    """Serialise ``table`` in memory, then commit it with one atomic write."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **write_kwargs)
    write_bytes_atomic(url, sink.getvalue().to_pybytes(), storage_options)


def read_parquet(url: str, columns: list[str] | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    fs, path = filesystem_for(url, storage_options)
    with fs.open(path, "rb") as fh:
        return pq.read_table(io.BytesIO(fh.read()), columns=columns)


def read_parquet_metadata(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[bytes, bytes]:
    """Key-value metadata of a Parquet file's schema (reads only the footer)."""
    fs, path = filesystem_for(url, storage_options)
    with fs.open(path, "rb") as fh:
        return dict(pq.ParquetFile(fh).schema_arrow.metadata or {})


def remove(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, path = filesystem_for(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def unique_suffix() -> str:
    return uuid.uuid4().hex[:12]
