"""``her2ray train``: k-fold cross-validation of KAT (or ABMIL) on Ray Train, one concurrent run per fold.

Settings come from ``--config`` (a YAML file: its ``train:`` section, or the whole file) and then from
flags, which win; the merged result is validated as one ``TrainConfig`` (unknown keys are errors).
"""

from __future__ import annotations

import argparse
from typing import Any

# flag dest -> TrainConfig key (flags default to None so only given flags override the YAML)
_FLAG_KEYS = ("folds", "seed", "model", "split_by", "balance", "max_epochs", "patience", "batch_size", "lr",
              "weight_decay", "aug_rate", "address", "cpus_per_fold", "gpus_per_fold", "max_concurrent_folds",
              "max_failures", "dim", "depth", "heads", "dim_head", "mlp_dim", "npk", "max_nodes", "dropout",
              "sg_layers", "sg_dropout", "sg_pooling", "graph_lambda_d", "graph_lambda_f", "graph_lambda_h",
              "torch_threads", "deterministic", "calibration", "screening_endpoints", "screening_sensitivities")


def _centers(value: str) -> list[str]:
    items = [c.strip() for c in value.split(",") if c.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of centers")
    return items


def _sensitivities(value: str) -> list[float]:
    try:
        items = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated sensitivities, e.g. 0.9,0.95") from None
    if not items:
        raise argparse.ArgumentTypeError("expected at least one sensitivity")
    return items


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="cross-validate KAT/ABMIL/SlideGraph+ on a feature store (Ray Train, folds in parallel)",
        description="Patient-grouped, HER2-stratified k-fold CV (or leave-one-center-out, or train/test by "
                    "center) of KAT or ABMIL. Writes splits, per-fold checkpoints, out-of-fold and test "
                    "predictions, metrics.json, report.md and PNGs to --out. Rerunning resumes.")
    p.add_argument("--features", required=True, help="feature store (local or s3://): features/, slides.parquet")
    p.add_argument("--manifest", required=True, help="labelled manifest: slide_id, her2_score[, patient_id][, center]")
    p.add_argument("--test-manifest", help="held-out labelled test manifest (evaluated by the fold ensemble)")
    p.add_argument("--out", required=True, help="run folder (local or s3://)")
    p.add_argument("--config", help="YAML with TrainConfig keys (top level or a 'train:' section)")
    p.add_argument("--folds", type=int, help="number of CV folds (default 5)")
    p.add_argument("--seed", type=int, help="split + training seed (default 0)")
    p.add_argument("--model", choices=("kat", "abmil", "slidegraph"),
                   help="slide model: kat (default), abmil, or slidegraph (SlideGraph+ GNN comparator)")
    p.add_argument("--split-by", choices=("patient", "center"), help="patient-grouped k-fold or leave-one-center-out")
    p.add_argument("--train-centers", type=_centers, help="external validation: CV within these centers (A,B)")
    p.add_argument("--test-centers", type=_centers, help="external validation: test on these centers (C)")
    p.add_argument("--balance", choices=("sampler", "loss"), help="class balance: weighted sampler (official) or "
                                                                   "class-weighted loss")
    p.add_argument("--max-epochs", type=int, help="epoch ceiling (default 200)")
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs on val macro AUC (default 20)")
    p.add_argument("--batch-size", type=int, help="slides per batch (default 32)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float, help="Adam weight decay (default 0)")
    p.add_argument("--aug-rate", type=float, help="tile-dropout augmentation rate (default 0.5)")
    p.add_argument("--address", help="Ray address (auto, host:6379, ray://host:10001); default: $RAY_ADDRESS inside a job, else a local Ray")
    p.add_argument("--cpus-per-fold", type=float, help="CPUs per fold worker (fractions allowed; default 1)")
    p.add_argument("--gpus-per-fold", type=float, help="GPUs per fold worker (e.g. 0.2 = 5 folds per GPU)")
    p.add_argument("--max-concurrent-folds", type=int, help="folds running at once (0 = all)")
    p.add_argument("--max-failures", type=int, help="Ray Train restarts per fold before giving up (default 1)")
    p.add_argument("--torch-threads", type=int, help="torch threads inside every fold, pinned so results are "
                                                      "bit-identical however folds are placed (default 1)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="torch.use_deterministic_algorithms(True) (for GPUs; CPU runs are deterministic anyway)")
    p.add_argument("--calibration", choices=("auto", "temperature", "vector", "none"),
                   help="post-hoc calibration fitted on the OOF predictions (default auto: temperature unless "
                        "vector scaling is clearly better)")
    p.add_argument("--screening-endpoints", type=_centers,
                   help="endpoints that get screening operating points (default her2_0_vs_low,her2_low_vs_positive)")
    p.add_argument("--screening-sensitivities", type=_sensitivities,
                   help="target sensitivities of the operating points (default 0.9,0.95)")
    for name, typ, hint in (("dim", int, 256), ("depth", int, 4), ("heads", int, 8), ("dim-head", int, 64),
                            ("mlp-dim", int, 512), ("npk", int, 144), ("max-nodes", int, 4096),
                            ("dropout", float, 0.5)):
        p.add_argument(f"--{name}", type=typ, help=f"model hyper-parameter (default {hint})")
    p.add_argument("--sg-layers", type=_widths, help="SlideGraph+ widths, e.g. 16,16,8 (default)")
    p.add_argument("--sg-dropout", type=float, help="SlideGraph+ dropout on pooled layer logits (default 0.5)")
    p.add_argument("--sg-pooling", choices=("mean", "max", "add"), help="SlideGraph+ node pooling (default mean)")
    for name, default, hint in (("lambda-d", 3e-3, "spatial decay per level-0 px"),
                                ("lambda-f", 1e-3, "feature-distance decay; scale it to your features"),
                                ("lambda-h", 0.8, "clustering cut")):
        p.add_argument(f"--graph-{name}", type=float, help=f"SlideGraph+ graph {hint} (default {default:g})")
    p.set_defaults(func=run)


def _widths(value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths, got {value!r}")
    return items


def config_from_args(args: argparse.Namespace):
    """YAML (if any) overlaid with the flags that were given, validated as ``TrainConfig``."""
    from ..config import yaml_section
    from ..training.config import TrainConfig

    data: dict[str, Any] = {}
    source = "flags"
    if args.config:
        data = yaml_section(args.config, "train")
        source = f"{args.config} + flags"
    for key in _FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    if args.train_centers is not None:
        data["train_centers"] = args.train_centers
    if args.test_centers is not None:
        data["test_centers"] = args.test_centers
    return TrainConfig.from_mapping(data, source=source)


def run(args: argparse.Namespace) -> int:
    from ..training.run import train_cv

    cfg = config_from_args(args)
    summary = train_cv(args.features, args.manifest, args.out, cfg, test_manifest=args.test_manifest)
    for fold, f in summary["folds"].items():
        state = "skipped (done)" if f["skipped"] else f"epochs {f['start_epoch']}..{f['epochs_run'] - 1}"
        print(f"fold {fold}: {state}, best epoch {f['best_epoch']}, val macro AUC {_fmt(f['val_auc'])}")
    print(f"val macro AUC (mean over folds) {_fmt(summary['val_auc_mean'])}; out-of-fold {_fmt(summary['oof_auc'])}"
          + (f"; test (ensemble) {_fmt(summary['test_auc'])}" if summary["test_auc"] is not None else ""))
    if summary["excluded"]:
        print(f"excluded {len(summary['excluded'])} slide(s): see {args.out}/excluded_slides.parquet")
    t = summary.get("timing") or {}
    if "training_s" in t:
        print(f"time: start-up {t['ray_start_s'] + t['fold_startup_s']:.1f} s (Ray start {t['ray_start_s']:.1f} s, "
              f"fold workers {t['fold_startup_s']:.1f} s); training {t['training_s']:.1f} s; inputs "
              f"{t['prepare_s']:.1f} s, reports {t['outputs_s']:.1f} s; wall {summary['seconds']:.1f} s")
    print(f"wrote {args.out}")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
