"""Heartbeats: a background thread that keeps saying "this run is alive", and the rule to read one.

A run that is killed (kill -9, node lost, OOM) cannot write "failed" into its ``run.json``, so a record that
says ``"status": "running"`` proves nothing. Every long-running stage therefore records ``started_utc``,
``host``, ``pid`` and a ``heartbeat_utc`` refreshed every ``interval_s`` while it works. ``liveness(record)``
tells a reader whether the run is alive (``running``), finished, or dead (``stale``: no heartbeat for more
than ``STALE_AFTER`` intervals).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

#: seconds between run.json heartbeats
DEFAULT_INTERVAL_S = 30.0
#: a running record whose heartbeat is older than this many intervals belongs to a dead run
STALE_AFTER = 4


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def process_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def process_gone(record: Mapping[str, Any]) -> bool:
    """True when ``record`` (``host``, ``pid``) names a process on THIS host that no longer exists (kill -9)."""
    return bool(record.get("host") == socket.gethostname() and record.get("pid") and not pid_alive(record["pid"]))


class Ticker:
    """Calls ``fn()`` every ``interval_s`` seconds in a daemon thread until ``stop()``; errors are logged."""

    def __init__(self, fn: Callable[[], None], interval_s: float, name: str = "her2ray-heartbeat"):
        self.fn, self.interval_s = fn, float(interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Ticker":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.fn()
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the run
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)


class RunHeartbeat:
    """Context manager: writes ``record`` (+ start, host, pid, heartbeat) to ``url`` now and every interval."""

    def __init__(self, url: str, record: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S):
        self.url, self.storage_options, self.interval_s = url, storage_options, float(interval_s)
        self.record = {**record, **process_identity(), "started_utc": utc_now(),
                       "heartbeat_interval_s": self.interval_s}
        self._ticker: Ticker | None = None

    def beat(self) -> None:
        from . import storage

        self.record["heartbeat_utc"] = utc_now()
        storage.write_text_atomic(self.url, json.dumps(self.record, indent=2, sort_keys=True, default=str) + "\n",
                                  self.storage_options)

    def final(self, **fields: Any) -> dict[str, Any]:
        """The record to write when the run ends (keeps start/host/pid, adds ``finished_utc``)."""
        return {**self.record, **fields, "finished_utc": utc_now()}

    def __enter__(self) -> "RunHeartbeat":
        self.beat()
        self._ticker = Ticker(self.beat, self.interval_s, name="her2ray-run-heartbeat").start()
        return self

    def __exit__(self, *exc) -> None:
        if self._ticker is not None:
            self._ticker.stop()


def liveness(record: Mapping[str, Any], now: float | None = None) -> str:
    """``finished`` / ``running`` / ``stale`` (a running record whose heartbeat stopped, or whose process on this
    host is gone: the run died)."""
    status = str(record.get("status", ""))
    if status != "running":
        return "finished" if status else "unknown"
    if process_gone(record):
        return "stale"
    beat = record.get("heartbeat_utc") or record.get("started_utc") or record.get("created_utc")
    if not beat:
        return "stale"
    age = (now if now is not None else time.time()) - _dt.datetime.fromisoformat(str(beat)).timestamp()
    interval = float(record.get("heartbeat_interval_s") or DEFAULT_INTERVAL_S)
    return "stale" if age > STALE_AFTER * interval else "running"


__all__ = ["DEFAULT_INTERVAL_S", "RunHeartbeat", "STALE_AFTER", "Ticker", "liveness", "pid_alive", "process_gone",
           "process_identity", "utc_now"]
