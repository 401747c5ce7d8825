"""One writer per feature store: a lease object ``<store>/_lease.json`` held by the running ``embed``.

Policy: **refuse**. A second ``embed`` into a store whose lease is held by a live run stops before any work
with ``StoreBusyError`` (exit code 4) naming the owner, host, pid and heartbeat age. Running two writers at
once could only duplicate work (same manifest) or race on ``slides.parquet``; refusing is the one behaviour
a lab can reason about. The runs can go one after the other on the same store: the second reuses what
the first embedded and the catalog keeps both runs' slides.

The lease record holds ``owner`` (a run id), ``host``, ``pid``, ``started_utc``, ``heartbeat_unix`` and
``ttl_s``; the holder refreshes the heartbeat every ``ttl_s / 4``. A lease is **stale**, and is taken over
by the next run, when its heartbeat is older than ``ttl_s`` or, on the same host, its process is gone
(so a rerun after kill -9 starts at once).

Guarantees by store type:

* local/NFS folders: creation with ``O_CREAT|O_EXCL`` (atomic); a stale lease is first renamed to a private
  name (only one contender can win the rename), then recreated exclusively;
* S3: conditional writes, ``If-None-Match: *`` to create and ``If-Match: <ETag>`` to renew, take over and
  delete (AWS S3 supports both since 2024; so does moto). A store that ignores these headers degrades to
  last-writer-wins on a simultaneous start; renewals still detect a lost lease;
* other fsspec stores: plain writes (best effort).

A run that loses its lease (its heartbeat stalled past ``ttl_s`` and another run took over) notices on the
next renewal and refuses to write the catalog; its feature files are still complete and valid.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any, Mapping

from .. import storage
from ..errors import StoreBusyError
from ..heartbeat import Ticker, process_gone, utc_now

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
#: seconds without a heartbeat after which a lease is stale
DEFAULT_TTL_S = 120.0


class LeaseConflict(Exception):
    """The object changed under us (conditional write failed)."""


# ------------------------------------------------------------------------------------------- backends
class _LocalBackend:
    def __init__(self, url: str):
        self.path = storage.local_path(url)

    def create(self, data: bytes) -> str | None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return _nonce(data)

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return _parse(data), _nonce(data)

    def replace(self, data: bytes, token: str) -> str:
        current = self.read()
        if current is None or current[1] != token:
            raise LeaseConflict("lease changed")
        self._write(data)
        return _nonce(data)

    def _write(self, data: bytes) -> None:
        storage.write_bytes_atomic(self.path, data)

    def _remove(self) -> None:
        os.unlink(self.path)

    def take_over(self, data: bytes, token: str) -> str | None:
        private = f"{self.path}.takeover-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, private)            # exactly one contender wins this rename
        except FileNotFoundError:
            return self.create(data)
        with open(private, "rb") as fh:
            taken = fh.read()
        if _nonce(taken) != token:                   # not the stale lease we judged: put it back, refuse
            try:
                os.link(private, self.path)
            except FileExistsError:
                pass
            os.unlink(private)
            return None
        os.unlink(private)
        return self.create(data)

    def delete(self, token: str) -> None:
        current = self.read()
        if current is not None and current[1] == token:
            self._remove()


class _S3Backend:
    def __init__(self, url: str, storage_options: Mapping[str, Any] | None):
        self.fs, path = storage.filesystem_for(url, storage_options)
        self.bucket, _, self.key = path.partition("/")

    def _put(self, data: bytes, **cond) -> str | None:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **cond)
        except Exception as exc:  # noqa: BLE001 - s3fs translates 412/409 into assorted OSErrors
            if _precondition_failed(exc):
                return None
            raise
        self.fs.invalidate_cache(f"{self.bucket}/{self.key}")
        return str(out.get("ETag", "")).strip('"')

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            out = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        data = _read_body(self.fs, out["Body"])
        return _parse(data), str(out.get("ETag", "")).strip('"')

    def replace(self, data: bytes, token: str) -> str:
        etag = self._put(data, IfMatch=token)
        if etag is None:
            raise LeaseConflict("lease changed")
        return etag

    def take_over(self, data: bytes, token: str) -> str | None:
        return self._put(data, IfMatch=token)

    def delete(self, token: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except Exception as exc:  # noqa: BLE001
            if not _precondition_failed(exc) and not isinstance(exc, FileNotFoundError):
                raise
        self.fs.invalidate_cache(f"{self.bucket}/{self.key}")


def _read_body(fs, body) -> bytes:
    from fsspec.asyn import sync

    async def read():
        return await body.read()

    return sync(fs.loop, read)


class _PlainBackend(_LocalBackend):
    """Any other fsspec store: unconditional writes (best effort; see the module docstring)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None):
        self.url, self.storage_options = url, storage_options

    def create(self, data: bytes) -> str | None:
        if storage.exists(self.url, self.storage_options):
            return None
        storage.write_bytes_atomic(self.url, data, self.storage_options)
        return _nonce(data)

    def read(self):
        try:
            data = storage.read_bytes(self.url, self.storage_options)
        except FileNotFoundError:
            return None
        return _parse(data), _nonce(data)

    def _write(self, data: bytes) -> None:
        storage.write_bytes_atomic(self.url, data, self.storage_options)

    def _remove(self) -> None:
        storage.remove(self.url, self.storage_options)

    def take_over(self, data: bytes, token: str) -> str | None:
        try:
            return self.replace(data, token)
        except LeaseConflict:
            return None


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc} {getattr(exc, '__cause__', '')}"
    return any(s in text for s in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"))


def _nonce(data: bytes) -> str:
    try:
        return str(json.loads(data).get("nonce"))
    except (ValueError, AttributeError):
        return ""


def _parse(data: bytes) -> dict[str, Any]:
    try:
        out = json.loads(data)
        return out if isinstance(out, dict) else {}
    except ValueError:
        return {}


def _backend(url: str, storage_options: Mapping[str, Any] | None):
    if storage.is_local(url):
        return _LocalBackend(url)
    if url.lower().startswith(("s3://", "s3a://")):
        return _S3Backend(url, storage_options)
    return _PlainBackend(url, storage_options)


# ------------------------------------------------------------------------------------------- the lease
def is_stale(record: Mapping[str, Any], now: float | None = None) -> str | None:
    """Why the lease ``record`` is stale (heartbeat too old, process gone), or None while it is alive."""
    now = time.time() if now is None else now
    age = now - float(record.get("heartbeat_unix") or 0.0)
    ttl = float(record.get("ttl_s") or DEFAULT_TTL_S)
    if age > ttl:
        return f"no heartbeat for {age:.0f} s (ttl {ttl:.0f} s)"
    if process_gone(record):
        return f"its process {record['pid']} on this host is gone"
    return None


class StoreLease:
    """``with StoreLease(store, command="embed"):`` holds the store's lease for the block (see module doc)."""

    def __init__(self, store: str, *, command: str = "embed", storage_options: Mapping[str, Any] | None = None,
                 ttl_s: float = DEFAULT_TTL_S, run_id: str | None = None):
        self.store, self.url = store, storage.join(store, LEASE_FILE)
        self.command, self.ttl_s = command, float(ttl_s)
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self._backend = _backend(self.url, storage_options)
        self._token: str | None = None
        self._ticker: Ticker | None = None
        self._started = utc_now()
        self.lost: str | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.run_id, "command": self.command, "host": socket.gethostname(),
                           "pid": os.getpid(), "started_utc": self._started, "heartbeat_utc": utc_now(),
                           "heartbeat_unix": time.time(), "ttl_s": self.ttl_s,
                           "nonce": uuid.uuid4().hex}, indent=2).encode()

    def acquire(self) -> "StoreLease":
        for _ in range(5):
            token = self._backend.create(self._record())
            if token is not None:
                self._token = token
                return self
            current = self._backend.read()
            if current is None:
                continue                                      # released meanwhile: try again
            record, token = current
            why = is_stale(record)
            if why is None:
                raise StoreBusyError(_busy_message(self.store, record))
            log.warning("%s: taking over a stale lease of run %s on %s (%s)", self.store, record.get("owner"),
                        record.get("host"), why)
            new = self._backend.take_over(self._record(), token)
            if new is not None:
                self._token = new
                return self
        raise StoreBusyError(f"{self.store}: could not take the store lease {self.url} (other runs kept "
                             "changing it); retry")

    def renew(self) -> None:
        if self._token is None or self.lost:
            return
        try:
            self._token = self._backend.replace(self._record(), self._token)
        except LeaseConflict:
            current = self._backend.read()
            owner = current[0].get("owner") if current else None
            self.lost = f"the store lease was taken over by run {owner}" if owner else "the store lease vanished"
            log.error("%s: %s; this run will not write the catalog", self.store, self.lost)

    def check(self) -> None:
        """Raise ``StoreBusyError`` if this run lost its lease (call before committing shared files)."""
        self.renew()
        if self.lost:
            raise StoreBusyError(f"{self.store}: {self.lost} (this run's heartbeat stalled for more than "
                                 f"{self.ttl_s:.0f} s); its feature files are kept, its catalog is not written. "
                                 "Rerun to complete the catalog.")

    def release(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        if self._token is not None and not self.lost:
            try:
                self._backend.delete(self._token)
            except Exception as exc:  # noqa: BLE001 - a leftover lease only expires later
                log.warning("%s: could not release the store lease: %s", self.store, exc)
        self._token = None

    def __enter__(self) -> "StoreLease":
        self.acquire()
        self._ticker = Ticker(self.renew, max(0.5, self.ttl_s / 4), name="her2ray-lease").start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _busy_message(store: str, record: Mapping[str, Any]) -> str:
    age = time.time() - float(record.get("heartbeat_unix") or 0.0)
    return (f"{store} is in use by another `her2ray {record.get('command', 'embed')}` run (run {record.get('owner')}, "
            f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started_utc')}, last "
            f"heartbeat {age:.0f} s ago). Two runs writing one store would redo each other's slides and race on "
            f"slides.parquet: wait for it to finish (then rerun: finished slides are skipped) or use another "
            f"--out. A lease whose heartbeat is older than {float(record.get('ttl_s') or DEFAULT_TTL_S):.0f} s, "
            "or whose process on this host is gone, is taken over automatically.")


__all__ = ["DEFAULT_TTL_S", "LEASE_FILE", "StoreLease", "is_stale"]
