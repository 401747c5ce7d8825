"""``her2ray demo``: synthetic cohort -> embed -> 5-fold KAT -> score -> evaluate -> heatmaps, locally.

Needs no data, no weights and no cluster. The hidden flags (``--folds``, ``--max-epochs``, ...) exist for
the test suite's reduced run; the visible ones are what a user should ever need.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole pipeline on a synthetic cohort (no data, weights or cluster needed)",
        description="Synthesise a small two-center cohort with a planted HER2-dependent signal, hold out a "
                    "stratified test set, embed with PLIP (random weights unless --weights), train 5-fold KAT, "
                    "score the test set, evaluate and draw heatmaps on a local Ray. Exits 1 if the test "
                    "macro AUC is below 0.9.")
    p.add_argument("--out", default="./her2ray-demo", help="output folder (default ./her2ray-demo)")
    p.add_argument("--weights", default=None,
                   help="PLIP weights (Hugging Face hub id or local dir); default: random weights, demo only")
    p.add_argument("--n-slides", type=int, default=48, help="synthetic slides (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohort, split and training (default 0)")
    hidden = argparse.SUPPRESS  # testing knobs: smaller runs for CI
    p.add_argument("--folds", type=int, default=5, help=hidden)
    p.add_argument("--max-epochs", type=int, default=None, help=hidden)
    p.add_argument("--patience", type=int, default=None, help=hidden)
    p.add_argument("--slide-px", type=int, default=None, help=hidden)
    p.add_argument("--min-auc", type=float, default=None, help=hidden)
    p.add_argument("--num-cpus", type=int, default=None, help=hidden)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoSettings, run_demo
    from ..errors import ConfigError

    if args.n_slides < 8:
        raise ConfigError("--n-slides must be >= 8 (every class needs train and test slides)")
    settings = DemoSettings(out=args.out, weights=args.weights, n_slides=args.n_slides, seed=args.seed,
                            folds=args.folds, num_cpus=args.num_cpus)
    for name in ("max_epochs", "patience", "slide_px", "min_auc"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return run_demo(settings)
