"""One way for every stage to get a Ray: the given address, ``$RAY_ADDRESS`` (set inside ``ray job submit``),
or a private local Ray started for this process.

A private Ray is started with ``address="local"``: without it ``ray.init()`` joins the newest cluster that
``ray start`` left on the machine (someone else's), and then fails on ``num_cpus``. Under a quiet console
(``her2ray.console``) worker output forwarded to the driver goes to the run's log file, not the terminal.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re

from . import console
from .errors import RayStartError

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ensure_ray(address: str | None = None, *, log_to_driver: bool = True, **init_kwargs) -> bool:
    """Connect or start Ray unless already initialised; True when this call did (the caller owns shutdown).

    A locally started Ray gets this checkout on its workers' ``PYTHONPATH`` so an uninstalled checkout works.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = console.ray_log_stream() is not None
    forward = log_to_driver or quiet or console.is_verbose()   # -v: worker output live on the terminal
    try:
        if address:
            probe_address(address)
            ray.init(address=address, log_to_driver=forward)
        else:
            path = os.pathsep.join(p for p in (_PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
            ray.init(address="local", include_dashboard=False, log_to_driver=forward,
                     runtime_env={"env_vars": {"PYTHONPATH": path}}, **init_kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure here means "no Ray": its own error and exit code
        raise ray_start_error(address, exc) from exc
    if quiet:
        route_worker_output(console.ray_log_stream())
    return True


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when a ``host:port`` Ray address has nothing listening (``ray.init`` would wait minutes)."""
    import socket

    if "://" in address or address in ("auto", "local") or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except ValueError:
        return
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc.strerror or exc})") from None


def ray_start_error(address: str | None, exc: BaseException) -> RayStartError:
    """The message for "Ray could not start": where, why, and what to check."""
    where = f"connect to the Ray cluster at {address}" if address else "start a local Ray"
    hint = ("check the address and that the cluster is up (`ray status --address ...`)" if address else
            "check free memory and /tmp space, and that no stale Ray holds the ports (`ray stop`)")
    return RayStartError(f"could not {where}: {type(exc).__name__}: {str(exc).strip()[:500]}; {hint}")


def route_worker_output(stream) -> bool:
    """Send worker stdout/stderr that Ray forwards to the driver into ``stream`` (the run's log file).

    Uses Ray's private log dispatcher (``ray._private.worker``); if that changes, worker output simply stays
    in Ray's session logs, which is also quiet. Returns whether the routing took.
    """
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", functools.partial(_print_to, stream, ray_worker))
        return True
    except Exception as exc:  # noqa: BLE001 - private API: degrade to Ray's own behaviour
        log.debug("could not route Ray worker output to the log: %s", exc)
        return False


def _print_to(stream, ray_worker, data) -> None:
    buf = io.StringIO()
    ray_worker.print_worker_logs(data, buf)
    try:
        stream.write(_ANSI.sub("", buf.getvalue()))   # a log file, not a terminal: no colour codes
    except (ValueError, OSError):   # the log was closed (command over, Ray still draining): drop the line
        pass


def shutdown_if_started(was_initialized: bool) -> None:
    """``ray.shutdown()`` when Ray was started (or joined) after ``was_initialized`` was taken: called by the CLI
    while its quiet console is still active, so Ray's teardown output also lands in the log."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and not was_initialized and ray.is_initialized():
        ray.shutdown()


def is_initialized() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())
