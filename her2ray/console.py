"""A quiet console: her2ray's own lines on the terminal, everything Ray (and other libraries) says in a log file.

Why fd-level: Ray writes from C++ (raylet / core_worker glog lines), from Python loggers that look up
``sys.stderr`` at emit time, from threads that die with a traceback and from forwarded worker output. Only
redirecting file descriptors 1 and 2 catches all of it. So, inside ``QuietConsole``:

* fds 1 and 2 (and so ``sys.stderr``, C++ output, child processes by default) point at the log file;
* ``sys.stdout`` writes to the real terminal (her2ray prints results with ``print``);
* ``stderr()`` is the real terminal's stderr, for her2ray's warnings, errors and progress bars;
* the root logger sends records of her2ray's own loggers (``her2ray.*``, ``jobs.*``) to the terminal and every
  record to the log file.

``-v`` (verbose) skips all of this: Ray's output is shown live, as before.
Stage processes started by the demo / jobs inherit the log through ``HER2RAY_RAY_LOG`` and the terminal
through ``child_stdio()``.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import Any, TextIO

#: a parent's log file, inherited by stage processes (they append to it and do not name it at the end)
LOG_ENV = "HER2RAY_RAY_LOG"
#: set to "1" in stage processes of a verbose parent
VERBOSE_ENV = "HER2RAY_VERBOSE"
#: loggers whose records are her2ray's own lines
OWN_LOGGERS = ("her2ray", "jobs", "__main__")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"

_active: "QuietConsole | None" = None
_verbose = False


def _own(record: logging.LogRecord) -> bool:
    return record.name == "root" or record.name.split(".")[0] in OWN_LOGGERS


def _console_stream(current: TextIO, fd: int, saved_fd: int) -> TextIO:
    """``current`` when it does not write to ``fd`` (pytest capture, a wrapper), else a stream on ``saved_fd``."""
    try:
        uses_fd = current.fileno() == fd
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        uses_fd = False
    if not uses_fd:
        return current
    return io.TextIOWrapper(os.fdopen(saved_fd, "wb", buffering=0, closefd=False), encoding="utf-8",
                            errors="replace", line_buffering=True, write_through=True)


class QuietConsole:
    """Context manager; ``log_path`` is created (append) when entered."""

    def __init__(self, log_path: str, *, name_at_end: bool = True):
        self.log_path = os.path.abspath(log_path)
        self.name_at_end = name_at_end
        self._saved: dict[str, Any] = {}

    # -- terminal streams while active ---------------------------------------------------------------
    out: TextIO
    err: TextIO
    log: TextIO

    def __enter__(self) -> "QuietConsole":
        global _active
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:  # noqa: BLE001 - a closed stream must not stop the command
                pass
        self._fd1, self._fd2 = os.dup(1), os.dup(2)
        self.out = _console_stream(sys.stdout, 1, self._fd1)
        self.err = _console_stream(sys.stderr, 2, self._fd2)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        self.log = io.TextIOWrapper(os.fdopen(os.dup(2), "wb", buffering=0), encoding="utf-8", errors="replace",
                                    line_buffering=True, write_through=True)
        root = logging.getLogger()
        self._saved = {"stdout": sys.stdout, "stderr": sys.stderr, "handlers": list(root.handlers),
                       "level": root.level, "active": _active}
        sys.stdout, sys.stderr = self.out, self.log
        to_console = logging.StreamHandler(self.err)
        to_console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        to_console.addFilter(_own)
        to_console.setLevel(logging.INFO)
        to_log = logging.StreamHandler(self.log)
        to_log.setFormatter(logging.Formatter(LOG_FORMAT))
        root.handlers = [to_console, to_log]
        root.setLevel(logging.INFO)
        self._moved = _move_library_handlers(self.log)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        root = logging.getLogger()
        for s in (sys.stdout, self.log, self.err):
            try:
                s.flush()
            except Exception:  # noqa: BLE001
                pass
        sys.stdout, sys.stderr = self._saved["stdout"], self._saved["stderr"]
        root.handlers = self._saved["handlers"]
        root.setLevel(self._saved["level"])
        for handler, stream in self._moved:
            _set_stream(handler, stream)
        _active = self._saved["active"]
        os.dup2(self._fd1, 1)
        os.dup2(self._fd2, 2)
        self.log.close()
        if self.err is not sys.stderr and self.err is not self._saved["stderr"]:
            self.err.flush()
        os.close(self._fd1)
        os.close(self._fd2)
        if self.name_at_end and os.path.exists(self.log_path) and os.path.getsize(self.log_path) > 0:
            print(f"Ray and library output: {self.log_path}", file=sys.stderr)

    def child_stdio(self) -> dict[str, int]:
        """``subprocess`` keyword arguments that give a child process the terminal (not the log)."""
        return {"stdout": _fileno(self.out, self._fd1), "stderr": _fileno(self.err, self._fd2)}


def _move_library_handlers(log: TextIO) -> list[tuple[logging.StreamHandler, Any]]:
    """Point the terminal handlers that libraries installed on their own loggers (Ray's ``ray`` and ``ray.data``
    loggers do not propagate) at the log; returns what to restore. A handler holds the stream object it was made
    with, which need not write to fd 2 (e.g. a wrapper replaced since), so the fd redirect alone misses it."""
    moved = []
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.split(".")[0] in OWN_LOGGERS:
            continue
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                moved.append((handler, handler.stream))
                _set_stream(handler, log)
    return moved


def _set_stream(handler: logging.StreamHandler, stream) -> None:
    """``handler.setStream`` that tolerates an old stream already closed (its flush would raise: seen when a
    library's handler outlived the stream it was made with, e.g. a test's captured stderr)."""
    try:
        handler.setStream(stream)
    except ValueError:
        with handler.lock:
            handler.stream = stream


def _fileno(stream: TextIO, fallback: int) -> int:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return fallback


def active() -> QuietConsole | None:
    return _active


def stderr() -> TextIO:
    """The terminal's stderr: her2ray's warnings, errors and progress bars go here, never into the Ray log."""
    return _active.err if _active is not None else sys.stderr


def child_stdio() -> dict[str, int]:
    return _active.child_stdio() if _active is not None else {}


def child_env(env: dict[str, str]) -> dict[str, str]:
    """Tell a stage process to append to this console's log (quiet) or to stay verbose."""
    env = dict(env)
    if _active is not None:
        env[LOG_ENV] = _active.log_path
    elif _verbose:
        env[VERBOSE_ENV] = "1"
    return env


def ray_log_stream() -> TextIO | None:
    """Where forwarded Ray worker output should go (None: Ray's default, the terminal)."""
    return _active.log if _active is not None else None


def set_verbose(on: bool) -> None:
    """``-v``: Ray's output stays live on the terminal (and stage processes inherit that)."""
    global _verbose
    _verbose = bool(on)


def is_verbose() -> bool:
    return _verbose or os.environ.get(VERBOSE_ENV) == "1"


__all__ = ["LOG_ENV", "QuietConsole", "VERBOSE_ENV", "active", "child_env", "child_stdio", "is_verbose",
           "ray_log_stream", "set_verbose", "stderr"]
