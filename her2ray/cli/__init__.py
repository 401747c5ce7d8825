"""The ``her2ray`` command: one subcommand per pipeline stage.

Each stage lives in ``her2ray/cli/<stage>.py`` and exposes ``add_parser(subparsers)``; the parser it
adds sets ``func`` to a callable taking the parsed namespace and returning an exit status.

Commands that start Ray run under a quiet console (``her2ray.console``): Ray's output goes to
``<out>/logs/<command>-ray.log``, named at the end; ``-v`` shows it live instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time

from .. import __version__, console, storage
from ..errors import Her2RayError
from .hints import HintingArgumentParser, parse_with_hints

# Order is the order of the pipeline, as shown in ``her2ray --help``.
STAGES: tuple[str, ...] = (
    "synth",
    "tile",
    "embed",
    "train",
    "score",
    "evaluate",
    "heatmap",
    "compare",
    "demo",
    "cohort",
    "doctor",
)
#: commands that start or join Ray: their Ray/library output goes to a log file unless -v
QUIET_COMMANDS = frozenset({"embed", "train", "score", "heatmap", "demo"})


def build_parser() -> argparse.ArgumentParser:
    parser = HintingArgumentParser(
        prog="her2ray",
        description="HER2 IHC score (0, 1+, 2+, 3+) prediction from H&E whole-slide images, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"her2ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own output live on the terminal (default: in a log file)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in STAGES:
        importlib.import_module(f"{__name__}.{stage}").add_parser(sub)
    for child in sub.choices.values():   # `her2ray embed ... -v` works too
        child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="debug logging; Ray's output live on the terminal")
    return parser


def ray_log_path(args: argparse.Namespace) -> tuple[str, str | None]:
    """(local log file, remote copy or None) for a quiet command: ``<out>/logs/<command>-ray.log``."""
    name = f"{args.command}-ray.log"
    out = getattr(args, "out", None)
    if out and storage.is_local(str(out)):
        return os.path.join(storage.local_path(str(out)), "logs", name), None
    local = os.path.join(tempfile.gettempdir(), "her2ray-logs", f"{time.strftime('%Y%m%d-%H%M%S')}-{name}")
    return local, (storage.join(str(out), "logs", name) if out else None)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except Her2RayError as exc:
        print(f"her2ray {args.command}: error: {exc}", file=console.stderr())
        return exc.exit_code          # 2 bad input, 3 Ray could not start, 4 store busy, 1 folds failed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_hints(parser, sys.argv[1:] if argv is None else list(argv))
    verbose = bool(getattr(args, "verbose", False)) or console.is_verbose()
    console.set_verbose(verbose)
    quiet = (not verbose and args.command in QUIET_COMMANDS and not getattr(args, "local", False))
    if not quiet:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _run(args)
    inherited = os.environ.get(console.LOG_ENV)
    local, remote = (inherited, None) if inherited else ray_log_path(args)
    from ..ray_runtime import is_initialized, shutdown_if_started

    had_ray = is_initialized()
    with console.QuietConsole(local, name_at_end=not inherited and remote is None) as quiet_console:
        print(f"\n===== her2ray {args.command} ({time.strftime('%Y-%m-%d %H:%M:%S')}) =====", file=quiet_console.log)
        try:
            rc = _run(args)
        finally:   # Ray's teardown talks too: let it do so into the log
            shutdown_if_started(had_ray)
    if remote:
        try:
            storage.write_bytes_atomic(remote, open(local, "rb").read())
            print(f"Ray and library output: {remote} (local copy {local})", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - the log is a convenience; never fail a finished run on it
            print(f"Ray and library output: {local} (copy to {remote} failed: {exc})", file=sys.stderr)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
