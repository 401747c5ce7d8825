"""Argument errors that help: a mistyped option names the closest valid option of *that* subcommand
(``her2ray embed --weigths X`` -> ``did you mean --weights?``), with the subcommand's usage, not the top level's."""

from __future__ import annotations

import argparse
import difflib
from typing import Sequence

_ARGV: list[str] = []


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def option_hints(parser: argparse.ArgumentParser, tokens: Sequence[str]) -> list[str]:
    """``--x did you mean --y?`` for every ``--option`` token that ``parser`` does not know."""
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    hints = []
    for tok in tokens:
        if not tok.startswith("--") or tok == "--":
            continue
        flag = tok.split("=", 1)[0]
        if flag in known or any(k.startswith(flag) for k in known):
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hints.append(f"unknown option {flag}: did you mean {close[0]}?" if close else f"unknown option {flag}")
    return hints


class HintingArgumentParser(argparse.ArgumentParser):
    """Adds typo hints to argparse's errors (subparsers inherit the class)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        hints = option_hints(self, _ARGV)
        if hints and "unrecognized arguments" not in message:
            message = f"{message}\n" + "\n".join(hints)
        super().error(message)


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub)parser that ``args`` went through."""
    while True:
        sub = _subparsers(parser)
        name = getattr(args, sub.dest, None) if sub is not None else None
        if name is None or name not in sub.choices:
            return parser
        parser = sub.choices[name]


def parse_with_hints(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parse_args``, but unknown options are reported by the subcommand that was chosen, with hints."""
    _ARGV[:] = list(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        target = chosen_parser(parser, args)
        hints = option_hints(target, extras)
        target.error("unrecognized arguments: " + " ".join(extras) + ("\n" + "\n".join(hints) if hints else ""))
    return args
