"""``her2ray compare``: the paper's Table 2 (ACC/AUC/F1 mean ± std, published numbers, paired test, ROC figure).

    her2ray compare cv_a=runs/kat_ab a_to_b=runs/kat_ab cv_b=runs/kat_b \\
                    cv_a=runs/sg_ab a_to_b=runs/sg_ab cv_b=runs/sg_b --out runs/table2
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="Table 2: compare finished training runs (KAT vs SlideGraph+) with the paper's numbers",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="SETTING=RUN",
                   help="a `her2ray train` run folder per model and setting; settings cv_* read the CV folds, "
                        "others the run's held-out test set; cv_a / cv_b / a_to_b get the paper's numbers")
    p.add_argument("--out", required=True, help="folder for table2.md, compare.json, roc_compare.png")
    p.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap replicates (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import storage
    from ..reports.compare import compare_runs

    compare_runs(args.runs, args.out, n_boot=args.n_boot, seed=args.seed)
    print(storage.read_text(storage.join(args.out, "table2.md")))
    return 0
