"""The ``her2ray`` command: one subcommand per pipeline stage.

Each stage lives in ``her2ray/cli/<stage>.py`` and exposes ``add_parser(subparsers)``; the parser it
adds sets ``func`` to a callable taking the parsed namespace and returning an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import Her2RayError

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
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="her2ray",
        description="HER2 IHC score (0, 1+, 2+, 3+) prediction from H&E whole-slide images, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"her2ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in STAGES:
        importlib.import_module(f"{__name__}.{stage}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except Her2RayError as exc:
        print(f"her2ray {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
