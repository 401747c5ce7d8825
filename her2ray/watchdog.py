"""Per-slide watchdog and crash accounting: no slide can hang a cohort, no slide is retried forever.

Two failure modes stall a cohort run, and both are handled per slide, inside the worker:

* **a slide that never answers** (a stalled network filesystem, an object store that stops sending bytes, a
  slide library stuck in a read): the worker runs each slide under a ``Watchdog``. The engines report
  progress with ``beat(stage)``; no beat for the slide's timeout means the slide is recorded as failed with
  ``timed out after N s while <stage>`` and the worker process exits, so Ray recycles it (a thread stuck in
  C code cannot be interrupted any other way) and the cohort goes on.
* **a slide that kills its worker** (a segfault in a native slide library, the OOM killer): Ray restarts
  the worker and retries the slide a *bounded* number of times (``max_task_retries``). Every attempt first
  asks the run's ``SlideLedger`` (one tiny Ray actor per run) how often this slide already started without
  finishing; from ``max_crashes`` on, the slide is failed with ``worker crashed N times on this slide``
  instead of being tried again.

The timeout is scaled by slide size: ``timeout_s + seconds_per_gib * size`` (opening or staging a big
remote slide is one long step without beats). ``Watchdog`` and ``beat`` are Ray-free; only ``make_ledger``
and ``guard`` talk to Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

log = logging.getLogger(__name__)

#: default ``--slide-timeout``: seconds without progress before a slide is failed
DEFAULT_SLIDE_TIMEOUT_S = 600.0
#: added to the timeout per GiB of slide file (staging/opening large slides is one long step)
SECONDS_PER_GIB = 300.0
#: crashes of a worker on one slide before the slide is failed (Ray retries it this many times)
DEFAULT_MAX_CRASHES = 2
#: exit status of a worker process that the watchdog ends (seen in Ray's worker logs)
WATCHDOG_EXIT_CODE = 75
#: comma-separated modules every worker imports at start (fault drills register test slide backends this way)
PLUGIN_ENV = "HER2RAY_WORKER_PLUGINS"


@dataclass(frozen=True)
class GuardConfig:
    """How a worker guards each slide: timeout (s, plus per GiB) and the crash budget."""

    timeout_s: float = DEFAULT_SLIDE_TIMEOUT_S
    seconds_per_gib: float = SECONDS_PER_GIB
    max_crashes: int = DEFAULT_MAX_CRASHES

    def to_dict(self) -> dict[str, float]:
        return {"timeout_s": self.timeout_s, "seconds_per_gib": self.seconds_per_gib,
                "max_crashes": self.max_crashes}


def slide_timeout_s(path: str | None, cfg: GuardConfig, storage_options: Mapping[str, Any] | None = None) -> float:
    """The slide's timeout: ``cfg.timeout_s`` + ``cfg.seconds_per_gib`` x its size in GiB (size 0 if unknown)."""
    size = 0
    if path:
        try:
            from . import storage

            if storage.is_local(path):
                size = os.stat(storage.local_path(path)).st_size
            else:
                fs, p = storage.filesystem_for(path, storage_options)
                size = int(fs.size(p) or 0)
        except Exception:  # noqa: BLE001 - an unknown size only means no extra time
            size = 0
    return float(cfg.timeout_s) + float(cfg.seconds_per_gib) * size / 2**30


class Watchdog:
    """A daemon thread that ends this process when the watched slide makes no progress in time.

    The ``on_timeout(slide_id, reason)`` given to ``watch`` runs first (it records the failure where the next
    attempt and the driver can see it), then the process exits with ``WATCHDOG_EXIT_CODE``. One per process
    (``process_watchdog``); one slide watched at a time.
    """

    def __init__(self, *, poll_s: float = 0.25, exit_process: Callable[[int], None] = os._exit):
        self._on_timeout: Callable[[str, str], None] | None = None
        self._poll_s, self._exit = poll_s, exit_process
        self._lock = threading.Lock()
        self._slide: str | None = None
        self._timeout = 0.0
        self._deadline = 0.0
        self._stage = ""
        self._thread = threading.Thread(target=self._run, name="her2ray-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, slide_id: str, timeout_s: float, on_timeout: Callable[[str, str], None] | None = None,
              stage: str = "starting"):
        global _ACTIVE
        with self._lock:
            self._slide, self._timeout, self._stage = slide_id, float(timeout_s), stage
            self._on_timeout = on_timeout
            self._deadline = time.monotonic() + float(timeout_s)
        previous, _ACTIVE = _ACTIVE, self
        try:
            yield self
        finally:
            _ACTIVE = previous
            with self._lock:
                self._slide = None

    def beat(self, stage: str | None = None) -> None:
        with self._lock:
            if self._slide is not None:
                self._deadline = time.monotonic() + self._timeout
                if stage:
                    self._stage = stage

    def _run(self) -> None:
        while True:
            time.sleep(self._poll_s)
            with self._lock:
                expired = self._slide is not None and time.monotonic() > self._deadline
                slide, timeout, stage, callback = self._slide, self._timeout, self._stage, self._on_timeout
            if not expired:
                continue
            reason = f"timed out after {timeout:.0f} s while {stage}"
            log.error("slide %s %s: recycling this worker", slide, reason)
            try:
                if callback is not None:
                    callback(str(slide), reason)
            finally:
                self._exit(WATCHDOG_EXIT_CODE)
            return


_ACTIVE: Watchdog | None = None
_PROCESS: Watchdog | None = None
_PROCESS_LOCK = threading.Lock()


def process_watchdog() -> Watchdog:
    """This process's watchdog (started on first use)."""
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None:
            _PROCESS = Watchdog()
        return _PROCESS


def beat(stage: str | None = None) -> None:
    """Progress of the slide being processed in this process (a no-op when nothing is watched)."""
    if _ACTIVE is not None:
        _ACTIVE.beat(stage)


# ----------------------------------------------------------------------------------------------- Ray side

class SlideLedger:
    """Per-run record of slide attempts and failures, shared by all workers (one Ray actor, 0 CPUs)."""

    def __init__(self):
        self.started: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self.failed: dict[str, str] = {}

    def begin(self, slide_id: str) -> tuple[int, str | None]:
        """Register an attempt; returns (earlier attempts that never finished = crashes, recorded failure)."""
        crashes = self.started.get(slide_id, 0) - self.finished.get(slide_id, 0)
        self.started[slide_id] = self.started.get(slide_id, 0) + 1
        return crashes, self.failed.get(slide_id)

    def finish(self, slide_id: str) -> None:
        self.finished[slide_id] = self.finished.get(slide_id, 0) + 1

    def fail(self, slide_id: str, reason: str) -> None:
        self.failed.setdefault(slide_id, reason)

    def report(self) -> dict[str, Any]:
        return {"started": dict(self.started), "finished": dict(self.finished), "failed": dict(self.failed)}


def make_ledger():
    """A fresh ledger actor for one run, on the driver's node (a worker node may be lost; the driver's node
    outlives the run). The caller drops the handle at the end; Ray then ends it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)(SlideLedger).remote()


def ledger_report(ledger, timeout_s: float = 30.0) -> dict[str, Any]:
    import ray

    try:
        return ray.get(ledger.report.remote(), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the driver then falls back to its own wording
        log.warning("slide ledger unavailable: %s", exc)
        return {"started": {}, "finished": {}, "failed": {}}


def crashed_message(n: int) -> str:
    return f"worker crashed {n} time{'s' if n != 1 else ''} on this slide"


def missing_reason(slide_id: str, report: Mapping[str, Any], cfg: GuardConfig) -> str:
    """Why a slide has no result row (driver side), from the ledger's record."""
    if slide_id in report.get("failed", {}):
        return report["failed"][slide_id]
    tries = int(report.get("started", {}).get(slide_id, 0)) - int(report.get("finished", {}).get(slide_id, 0))
    if tries == 1:       # a crash would have been retried (and the retry returns a row): an error was raised
        return "the worker raised an error on this slide instead of returning a status (see the Ray worker logs)"
    if tries > 1:
        return crashed_message(tries)
    return (f"no result from the worker (it crashed before starting the slide; at most {cfg.max_crashes} "
            "retries; see the Ray worker logs)")


class Guard:
    """Worker side: one watchdog per process, the run's ledger, and the rule deciding whether to try a slide."""

    def __init__(self, ledger, cfg: GuardConfig, storage_options: Mapping[str, Any] | None = None):
        self.ledger, self.cfg, self.storage_options = ledger, cfg, storage_options
        self.watchdog = process_watchdog()

    def _record_timeout(self, slide_id: str, reason: str) -> None:
        if self.ledger is not None:
            import ray

            ray.get(self.ledger.fail.remote(slide_id, reason), timeout=10)

    def _admit(self, slide_id: str) -> str | None:
        """Register an attempt with the ledger; the recorded failure (timeout, too many crashes) if any."""
        import ray

        crashes, failure = 0, None
        if self.ledger is not None:
            try:
                crashes, failure = ray.get(self.ledger.begin.remote(slide_id), timeout=60)
            except Exception as exc:  # noqa: BLE001 - without the ledger the slide still runs (watched)
                log.warning("slide ledger unavailable (%s): %s runs without crash accounting", exc, slide_id)
                self.ledger = None
        if failure is None and crashes >= self.cfg.max_crashes:
            failure = crashed_message(crashes)
            self.ledger.fail.remote(slide_id, failure)
        return failure

    def _done(self, slide_id: str) -> None:
        if self.ledger is not None:
            self.ledger.finish.remote(slide_id)

    def run(self, slide_id: str, path: str | None, work: Callable[[], dict[str, Any]],
            failed_row: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """``work()`` under the watchdog, unless the slide already timed out or crashed its worker too often."""
        failure = self._admit(slide_id)
        if failure is not None:
            row = failed_row(failure)
        else:
            timeout = slide_timeout_s(path, self.cfg, self.storage_options)
            with self.watchdog.watch(slide_id, timeout, self._record_timeout):
                row = work()
        self._done(slide_id)
        return row

    def iterate(self, key: str, path: str | None, items: Iterator[Any], failed_item: Callable[[str], Any],
                stage: str = "reading tiles") -> Iterator[Any]:
        """``items`` one by one, each *produced* under the watchdog (timeout per item; the time the consumer
        holds this generator suspended between items does not count), unless ``key`` already timed out or
        crashed its worker too often: then only ``failed_item(reason)``. ``key`` is the ledger's key (a read
        unit: attempts of different units of one slide must not count as each other's crashes)."""
        failure = self._admit(key)
        if failure is not None:
            yield failed_item(failure)
        else:
            timeout = slide_timeout_s(path, self.cfg, self.storage_options)
            end = object()
            while True:
                with self.watchdog.watch(key, timeout, self._record_timeout, stage=stage):
                    item = next(items, end)
                if item is end:
                    break
                yield item
        self._done(key)


_active_plugins: frozenset[str] = frozenset()


def load_plugins(names: str | None) -> None:
    """Import the worker plugin modules named in ``names`` (comma-separated; see ``PLUGIN_ENV``) and make exactly
    these the active ones. Ray reuses worker processes across tasks, so a module imported for one run stays
    imported: plugins must check ``plugin_active`` rather than act merely because they are loaded."""
    import importlib

    global _active_plugins
    wanted = [n for n in (n.strip() for n in (names or "").split(",")) if n]
    for name in wanted:
        importlib.import_module(name)
    _active_plugins = frozenset(wanted)


def plugin_active(name: str) -> bool:
    """Whether the current task asked for plugin module ``name`` (see ``load_plugins``)."""
    return name in _active_plugins


def ray_task_options(cfg: GuardConfig) -> dict[str, Any]:
    """Remote options for slide actors. The bound on a slide's crashes is the ledger's (``cfg.max_crashes``):
    the attempt after the last allowed crash returns a failed row instead of trying again. Ray's own
    counters stay unlimited on purpose: a lost node makes every task queued on its actors fail once or more
    without any slide being at fault (a bounded ``max_task_retries`` dropped such slides in the two-node
    drill), and a pool whose actor stays dead (bounded ``max_restarts``) stalls. Set explicitly here rather
    than inherited, so a change of Ray's defaults cannot silently change the behaviour."""
    return {"max_restarts": -1, "max_task_retries": -1}


__all__ = ["DEFAULT_MAX_CRASHES", "DEFAULT_SLIDE_TIMEOUT_S", "Guard", "GuardConfig", "PLUGIN_ENV", "SECONDS_PER_GIB",
           "SlideLedger", "Watchdog", "beat", "process_watchdog", "ledger_report", "load_plugins", "plugin_active", "make_ledger", "missing_reason",
           "ray_task_options", "slide_timeout_s"]
