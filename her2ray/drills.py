"""Fault drills: a slide backend that really crashes or hangs its process, for tests and cluster checks.

Loaded into every worker by ``HER2RAY_WORKER_PLUGINS=her2ray.drills`` (see ``her2ray.watchdog.PLUGIN_ENV``); it
wraps the ``openslide`` backend and reacts to marker words in the slide's file name:

* ``__segv__``: the process kills itself with SIGSEGV (a native crash in a slide library), every time;
* ``__crash_once__``: SIGKILL on the first open only, while a sidecar file ``<path>.crash-once`` exists
  (deleted before dying), so the retry succeeds;
* ``__hang__``: the open never returns (a stalled network filesystem);
* ``__hang_read__``: the open and the thumbnail work, reading tile pixels never returns (a slide library stuck
  in a read after the slide was planned).

Any other slide opens normally. Nothing here is imported unless the variable names this module, and a worker
that imported it for an earlier task behaves normally unless the current task names it too.
"""

from __future__ import annotations

import os
import signal
import time

from . import watchdog
from .slides.registry import register_backend

SEGV, CRASH_ONCE, HANG, HANG_READ = "__segv__", "__crash_once__", "__hang__", "__hang_read__"


def _hang_forever(*_args, **_kwargs):
    while True:
        time.sleep(3600)


def drill_backend(path_for_messages, local_path, **kwargs):
    from .slides.openslide_backend import OpenSlideReader

    if not watchdog.plugin_active(__name__):      # loaded by an earlier task of this reused worker: stay inert
        return OpenSlideReader(path_for_messages, local_path, **kwargs)
    name = os.path.basename(str(local_path))
    if SEGV in name:
        os.kill(os.getpid(), signal.SIGSEGV)
    if CRASH_ONCE in name:
        marker = f"{local_path}.crash-once"
        if os.path.exists(marker):
            os.unlink(marker)
            os.kill(os.getpid(), signal.SIGKILL)
    if HANG in name:
        _hang_forever()
    reader = OpenSlideReader(path_for_messages, local_path, **kwargs)
    if HANG_READ in name:
        reader._read_rgb = _hang_forever
    return reader


register_backend("openslide", drill_backend, replace=True)
