"""``her2ray evaluate``: metrics, patient-level bootstrap CIs, calibration and per-center results of a
scoring output against a labelled manifest (local files or any fsspec URL such as ``s3://``)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="evaluate predictions against labels (metrics.json, report.md, PNGs)",
        description="Compare scoring output with HER2 labels: accuracy, AUCs, F1, QWK, clinical endpoints with "
                    "FPR/FNR, 95% patient-level bootstrap CIs, calibration (ECE) and per-center metrics.")
    p.add_argument("--predictions", required=True,
                   help="scoring output (Parquet/CSV): slide_id, prob_her2_0, prob_her2_1plus, prob_her2_2plus, "
                        "prob_her2_3plus[, pred_score]")
    p.add_argument("--manifest", required=True,
                   help="labelled manifest (Parquet/CSV): slide_id, her2_score[, patient_id][, center]")
    p.add_argument("--out", required=True, help="output folder (local or s3://...)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--n-bins", type=int, default=10, help="calibration bins (default 10)")
    p.add_argument("--title", default="HER2 scoring evaluation", help="report title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..reports.evaluate import evaluate_predictions

    if args.n_boot < 1:
        raise ConfigError("--n-boot must be >= 1")
    if args.n_bins < 1:
        raise ConfigError("--n-bins must be >= 1")
    result = evaluate_predictions(args.predictions, args.manifest, args.out, n_boot=args.n_boot,
                                  seed=args.seed, n_bins=args.n_bins, title=args.title)
    ci = result["bootstrap_ci"]

    def show(key: str) -> str:
        v, c = result.get(key), ci.get(key, {})
        if v is None:
            return "n/a"
        if c.get("lo") is None:
            return f"{v:.3f}"
        return f"{v:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"

    m = result["matching"]
    print(f"evaluated {m['n_evaluated']} slides ({len(m['predictions_without_label'])} predictions without label, "
          f"{len(m['labels_without_prediction'])} labels without prediction)")
    print(f"accuracy {show('accuracy')}  AUC macro {show('auc_macro_ovr')}  F1 macro {show('f1_macro')}  "
          f"QWK {show('qwk')}  ECE {result['calibration']['ece']:.3f}"
          + (f" (uncalibrated {result['calibration_change']['before']['ece']:.3f})"
             if "calibration_change" in result else ""))
    for s in result.get("screening", []):
        sens, spec = s["sensitivity"], s["specificity"]
        print(f"{s['column']}: sensitivity {_pct(sens)} (target {100 * s['target_sensitivity']:g} %), "
              f"specificity {_pct(spec)}; {s['n_positive']} positive / {s['n_negative']} negative slides")
    print(f"wrote {args.out}")
    return 0


def _pct(stat) -> str:
    if stat.get("estimate") is None:
        return "n/a"
    ci = f" [{100 * stat['lo']:.1f}, {100 * stat['hi']:.1f}]" if stat.get("lo") is not None else ""
    return f"{100 * stat['estimate']:.1f} %{ci}"
