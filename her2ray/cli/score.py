"""``her2ray score``: predict HER2 scores for a cohort's feature files with a trained fold ensemble (Ray Data)."""

from __future__ import annotations

import argparse

from .. import console
from ..config import yaml_section


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score", help="score slides with the trained fold ensemble (Ray Data batch inference)",
        description="Average the folds' softmax per slide. Writes OUT/predictions.parquet + .csv, "
                    "OUT/failed.csv (slides not scored, with the reason), OUT/run.json and, with --attention, "
                    "OUT/attention/<slide_id>.parquet (x, y, score per tile) for `her2ray heatmap`.")
    p.add_argument("--features", required=True, help="feature store folder or s3:// prefix (`her2ray embed --out`)")
    p.add_argument("--model", required=True, help="training run folder (`her2ray train --out`)")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--manifest", help="CSV/Parquet with slide_id: score only these; its other columns are "
                                      "carried into the predictions")
    p.add_argument("--attention", action="store_true", help="also write per-tile attention for heatmaps")
    p.add_argument("--address", help="Ray address (e.g. auto, ray://host:10001); default: local Ray")
    p.add_argument("--batch-slides", type=int, default=None, help="slides per actor call (default 8)")
    p.add_argument("--actors", type=int, default=None, help="scoring actors (default 1)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs per actor (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=None, nargs="?", const=1.0,
                   help="GPUs per actor; fractions share a GPU (flag alone = 1)")
    p.add_argument("--slide-timeout", type=float, default=None,
                   help="seconds without progress on one slide before it is failed and its worker recycled "
                        "(default 600, plus 300 per GiB of feature file)")
    p.add_argument("--max-worker-crashes", type=int, default=None,
                   help="worker crashes on one slide after which it is failed (default 2)")
    p.add_argument("--config", help="YAML file; its `score` section (or the whole file) gives defaults, flags win")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=run)
    return p


def _config(args):
    from ..scoring.pipeline import ScoreConfig

    data = yaml_section(args.config, "score") if args.config else {}
    flags = {"features": args.features, "model": args.model, "out": args.out, "manifest": args.manifest,
             "address": args.address, "batch_slides": args.batch_slides, "actors": args.actors,
             "cpus_per_actor": args.cpus_per_actor, "gpus_per_actor": args.gpus_per_actor,
             "slide_timeout": args.slide_timeout, "max_worker_crashes": args.max_worker_crashes}
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.attention:
        data["attention"] = True
    if args.no_progress:
        data["progress"] = False
    return ScoreConfig.from_mapping(data, source=args.config or "her2ray score flags")


def run(args) -> int:
    from ..scoring.pipeline import score_cohort

    summary = score_cohort(_config(args))
    counts = ", ".join(f"{k}: {v}" for k, v in summary.class_counts.items())
    t = summary.timing
    scoring = (f"scored {summary.n_scored}/{summary.n_requested} slides in {t['scoring_s']:.1f} s of scoring "
               f"(start-up {summary.startup_s:.1f} s: Ray {t.get('ray_start_s', 0):.1f} s, actors + fold models "
               f"{t.get('actor_startup_s', 0):.1f} s; wall {summary.seconds:.1f} s) " if "scoring_s" in t else
               f"scored {summary.n_scored}/{summary.n_requested} slides in {summary.seconds:.1f} s ")
    print(scoring +
          f"({summary.n_failed} not scored, see {summary.out}/failed.csv); predicted {counts}; "
          f"HER2-low {summary.n_her2_low}; model {summary.model.get('run_id')} "
          f"sha256 {str(summary.model.get('sha256'))[:12]}", file=console.stderr())
    return 0
