"""``her2ray demo``: the whole pipeline on a synthetic cohort, on a fresh machine, in minutes.

Why it exists: a new user (or CI) should see every stage work end to end (no data, no weights, no
cluster) and get a clear pass/fail on a planted signal. It is deliberately thin:

1. synthesise a small multi-center cohort with a HER2-dependent pattern (``her2ray.synth``),
2. hold out a stratified, patient-disjoint test set (~25 %),
3. run the *production* pipeline (``jobs._common.run_pipeline``: embed -> train -> score -> evaluate ->
   heatmap) on a local Ray started for it, with demo-sized settings (small slides, small KAT, few epochs);
   the science defaults of each stage stay untouched,
4. write ``demo_summary.json``, ``demo_report.md`` and small README-ready PNGs, print the test metrics and
   fail (exit 1) when the test macro AUC is below the bar.

Without ``--weights`` PLIP runs with RANDOM weights. The demo says so on screen and in every report,
because random-weight features only work here because the planted signal is strong.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

RANDOM_WEIGHTS_NOTICE = "PLIP weights: RANDOM (demo only)"
MIN_TEST_AUC = 0.9
README_PNG_MAX_PX = 640


def cpu_precision() -> str | None:
    """``bf16-pure`` where the CPU runs bf16 natively (~3.5x fp32 for PLIP), else the stage default.

    Demo only: random weights make the small bf16 deviation irrelevant; on CPUs without native bf16 it
    would be emulated and much slower than fp32, hence the check.
    """
    try:
        import torch

        if not torch.cuda.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "bf16-pure"
    except Exception:  # private API: any failure means "use the default"
        pass
    return None


@dataclass
class DemoSettings:
    """Demo-sized knobs. Chosen to finish in < 10 min on a 2-core laptop (see tests/test_demo.py)."""

    out: str = "./her2ray-demo"
    weights: str | None = None
    n_slides: int = 48
    seed: int = 0
    centers: tuple[str, ...] = ("center_a", "center_b")
    test_fraction: float = 0.25
    min_auc: float = MIN_TEST_AUC
    # Synthetic slide size (level-0 px at 0.5 um/px): few tiles per slide keep CPU embedding short.
    slide_px: int = 1280
    # Training / model (KAT stays KAT; only its size and the epoch budget shrink).
    folds: int = 5
    max_epochs: int = 25
    patience: int = 8
    train_options: dict[str, Any] = field(default_factory=lambda: {
        "dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_dim": 128, "npk": 16,
        "dropout": 0.1, "batch_size": 8, "lr": 1e-3,
        "cpus_per_fold": 0.4,  # all 5 folds at once on 2 cores: Ray Train start-up dominates, not compute
    })
    embed_options: dict[str, Any] = field(default_factory=lambda: {"precision": cpu_precision()})
    evaluate_options: dict[str, Any] = field(default_factory=lambda: {"n_boot": 200})
    heatmap_options: dict[str, Any] = field(default_factory=dict)
    num_cpus: int | None = None

    @property
    def weights_label(self) -> str:
        return f"PLIP weights: {self.weights}" if self.weights else RANDOM_WEIGHTS_NOTICE


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------

def synthesize(settings: DemoSettings, cohort_dir: Path) -> list[dict[str, Any]]:
    """Write the synthetic slides + manifest.csv; returns the manifest rows."""
    from .synth import synth_cohort

    return synth_cohort(str(cohort_dir), settings.n_slides, centers=list(settings.centers),
                        seed=settings.seed, width_px=settings.slide_px, height_px=settings.slide_px)


def holdout_split(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified (HER2 score) and patient-disjoint train/test split.

    Uses StratifiedGroupKFold with round(1/fraction) folds and takes one fold as the test set, so every
    class is in the test set (needed for a macro AUC) and no patient is on both sides.
    """
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    from .labels import parse_her2_score

    y = np.array([parse_her2_score(r["her2_score"]) for r in rows])
    groups = np.array([str(r.get("patient_id") or r["slide_id"]) for r in rows])
    n_splits = max(2, round(1 / fraction))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, test_idx = next(splitter.split(np.zeros(len(rows)), y, groups))
    test = set(test_idx.tolist())
    return [r for i, r in enumerate(rows) if i not in test], [r for i, r in enumerate(rows) if i in test]


def write_manifest(rows: list[dict[str, Any]], path: Path) -> str:
    import csv

    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def pipeline_config(settings: DemoSettings, train_manifest: str, test_manifest: str, out: Path):
    """The demo's run description: the same schema as jobs/configs/*.yaml."""
    from jobs._common import PipelineConfig

    embed = dict(settings.embed_options)
    if settings.weights:
        embed["weights"] = settings.weights
    train = {"folds": settings.folds, "max_epochs": settings.max_epochs, "patience": settings.patience,
             "seed": settings.seed, **settings.train_options}
    evaluate = {"title": f"her2ray demo (synthetic cohort), {settings.weights_label}",
                **settings.evaluate_options}
    return PipelineConfig.from_mapping({
        "manifest": train_manifest, "test_manifest": test_manifest, "out": str(out),
        "ray": {"num_cpus": settings.num_cpus},
        "embed": embed, "train": train, "evaluate": evaluate, "heatmap": dict(settings.heatmap_options),
    }, source="her2ray demo")


def _first(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        found = sorted(folder.rglob(pattern))
        if found:
            return found[0]
    return None


def _best_heatmap(predictions: Path, heatmaps: Path) -> Path | None:
    """The heatmap of the test slide scored most confidently 3+ (the most telling picture), else any."""
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(predictions / "predictions.parquet", columns=["slide_id", "prob_her2_3plus"])
        ranked = sorted(zip(table["prob_her2_3plus"].to_pylist(), table["slide_id"].to_pylist()), reverse=True)
        for _, slide_id in ranked:
            if (heatmaps / f"{slide_id}.png").exists():
                return heatmaps / f"{slide_id}.png"
    except Exception:  # the picture is a nicety: fall back to the first PNG
        pass
    return _first(heatmaps, ("*.png",))


def collect_outputs(out: Path) -> dict[str, Path | None]:
    """Where the stages put the files a user wants to open first."""
    from jobs._common import Layout

    layout = Layout(str(out))
    evaluation, heatmaps = Path(layout.evaluation), Path(layout.heatmaps)
    return {
        "metrics": _first(evaluation, ("metrics.json",)),
        "report": _first(evaluation, ("report.md",)),
        "roc_png": _first(evaluation, ("*roc*.png",)),
        "confusion_png": _first(evaluation, ("*confusion*.png",)),
        "heatmap_png": _best_heatmap(Path(layout.predictions), heatmaps),
        "predictions": _first(Path(layout.predictions), ("predictions.parquet", "*.parquet", "*.csv")),
        "cv_metrics": _first(Path(layout.run), ("metrics.json",)),
    }


def readme_pngs(outputs: dict[str, Path | None], folder: Path) -> dict[str, str]:
    """Small copies (<= 640 px) of the ROC, confusion and heatmap plots, ready to embed in a README."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for key in ("roc_png", "confusion_png", "heatmap_png"):
        src = outputs.get(key)
        if src is None:
            continue
        dst = folder / f"{key.removesuffix('_png')}.png"
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((README_PNG_MAX_PX, README_PNG_MAX_PX))
            im.save(dst, optimize=True)
        written[key] = str(dst)
    return written


def check_auc(metrics: dict[str, Any] | None, min_auc: float) -> tuple[bool, str]:
    """The demo's pass/fail rule, with a message that says exactly what held or did not."""
    auc = (metrics or {}).get("auc_macro_ovr")
    if auc is None or auc != auc:  # missing or NaN
        return False, "CHECK FAILED: test macro AUC is not available (needs every class in the test set)"
    if auc >= min_auc:
        return True, f"CHECK PASSED: test macro AUC {auc:.3f} >= {min_auc:.2f}"
    return False, (f"CHECK FAILED: test macro AUC {auc:.3f} < {min_auc:.2f}; the planted HER2 signal was not "
                   f"recovered (see the report)")


def _fold_mean(value: Any) -> Any:
    """``{"mean": m, "std": ..., "per_fold": [...]}`` (train's summary) -> m; a plain number passes."""
    return value.get("mean") if isinstance(value, dict) else value


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    keys = ("auc_macro_ovr", "accuracy", "f1_macro", "f1_micro", "qwk")
    lines = [f"  {k:<14} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), (int, float))]
    per_class = metrics.get("auc_per_class") or {}
    if per_class:
        lines.append("  auc per class  " + "  ".join(
            f"{c}: {v:.3f}" if isinstance(v, (int, float)) else f"{c}: n/a" for c, v in per_class.items()))
    return lines


def write_report(path: Path, summary: dict[str, Any]) -> None:
    """demo_report.md: what ran, with which weights, how long, and how well (links relative to --out)."""
    rel = lambda p: os.path.relpath(p, path.parent) if p else "(missing)"  # noqa: E731
    m = summary.get("test_metrics") or {}
    lines = [
        "# her2ray demo", "",
        f"**{summary['weights']}**" + ("" if summary["weights_are_real"] else
                                        " -- features come from an untrained PLIP; the scores below only show "
                                        "that the pipeline recovers a strong planted signal, nothing clinical."),
        "",
        f"Synthetic cohort: {summary['n_slides']} slides, centers {', '.join(summary['centers'])}, "
        f"{summary['n_train']} train ({summary['folds']}-fold cross-validated KAT) / {summary['n_test']} "
        f"held-out test (scored by the {summary['folds']}-fold ensemble).",
        "", f"Cross-validation macro AUC: {_fmt(summary.get('cv_val_auc_mean'))} (mean of the folds' "
        f"validation AUCs), {_fmt(summary.get('cv_oof_auc'))} (pooled out-of-fold predictions)",
        "", "## Held-out test metrics", "", "| metric | value |", "|---|---|",
        *[f"| {k} | {m[k]:.3f} |" for k in ("auc_macro_ovr", "accuracy", "f1_macro", "qwk")
          if isinstance(m.get(k), (int, float))],
        "", f"{summary['check']}", "", "## Stage times", "", "| stage | seconds |", "|---|---|",
        *[f"| {s} | {t:.1f} |" for s, t in summary["stage_seconds"].items()],
        f"| **total** | **{summary['total_seconds']:.1f}** |", "", "## Files", "",
        *[f"- {k}: [{rel(v)}]({rel(v)})" for k, v in summary["outputs"].items() if v],
    ]
    for key in ("roc_png", "heatmap_png"):
        if summary["readme_pngs"].get(key):
            lines += ["", f"![{key}]({rel(summary['readme_pngs'][key])})"]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------

def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> int:
    """Run the demo; returns the exit status (0 = pipeline ran and the AUC check held)."""
    from jobs._common import ALL_STAGES, StageFailed, run_pipeline

    start = time.perf_counter()
    out = Path(settings.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cohort_dir = out / "cohort"
    stages = list(ALL_STAGES)
    total = 1 + len(stages)

    log(f"her2ray demo -> {out}")
    log(f"*** {settings.weights_label} ***" + ("" if settings.weights else
        "  (pass --weights HUB_ID_OR_DIR for real PLIP weights)"))

    log(f"\n=== [1/{total}] synth === {settings.n_slides} synthetic slides, centers "
        f"{', '.join(settings.centers)}, seed {settings.seed}")
    t0 = time.perf_counter()
    # A rerun must not mix two cohorts: stages resume/skip by slide id, so clear what the demo wrote before.
    for name in ("cohort", "manifests", "store", "run", "predictions", "evaluation", "heatmaps", "readme"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    rows = synthesize(settings, cohort_dir)
    train_rows, test_rows = holdout_split(rows, settings.test_fraction, settings.seed)
    train_manifest = write_manifest(train_rows, cohort_dir / "train_manifest.csv")
    test_manifest = write_manifest(test_rows, cohort_dir / "test_manifest.csv")
    timings = {"synth": time.perf_counter() - t0}
    log(f"=== [1/{total}] synth done in {timings['synth']:.1f} s === {len(train_rows)} train / "
        f"{len(test_rows)} held-out test slides")

    cfg = pipeline_config(settings, train_manifest, test_manifest, out)
    try:
        timings.update(run_pipeline(cfg, stages, source="her2ray demo", log=log, first_index=2, total=total,
                                    started_at=start))
    except StageFailed as exc:
        log(f"\nher2ray demo: FAILED in stage {exc.stage} (exit {exc.rc}); outputs so far under {out}")
        return 1

    outputs = collect_outputs(out)
    metrics = json.loads(outputs["metrics"].read_text()) if outputs["metrics"] else None
    cv = json.loads(outputs["cv_metrics"].read_text()) if outputs["cv_metrics"] else {}
    ok, check = check_auc(metrics, settings.min_auc)
    pngs = readme_pngs(outputs, out / "readme")
    total_seconds = time.perf_counter() - start
    summary = {
        "weights": settings.weights_label, "weights_are_real": bool(settings.weights),
        "n_slides": len(rows), "n_train": len(train_rows), "n_test": len(test_rows),
        "centers": list(settings.centers), "folds": settings.folds, "seed": settings.seed,
        "test_metrics": {k: v for k, v in (metrics or {}).items()
                         if k in ("auc_macro_ovr", "auc_per_class", "accuracy", "f1_macro", "f1_micro", "qwk",
                                  "confusion_matrix")},
        "cv_val_auc_mean": _fold_mean((cv.get("val") or {}).get("auc_macro_ovr")),
        "cv_oof_auc": (cv.get("oof") or {}).get("auc_macro_ovr"),
        "min_auc": settings.min_auc, "passed": ok, "check": check,
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()}, "total_seconds": round(total_seconds, 1),
        "outputs": {k: str(v) if v else None for k, v in outputs.items()}, "readme_pngs": pngs,
        "settings": {k: v for k, v in asdict(settings).items() if k != "out"},
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_report(out / "demo_report.md", summary)

    log(f"\n=== her2ray demo finished in {total_seconds / 60:.1f} min ===")
    log(f"*** {settings.weights_label} ***")
    log(f"Cross-validation ({settings.folds} folds): val macro AUC mean {_fmt(summary['cv_val_auc_mean'])}, "
        f"pooled out-of-fold {_fmt(summary['cv_oof_auc'])}")
    log(f"Held-out test set ({len(test_rows)} slides, fold ensemble):")
    for line in _metric_lines(metrics or {}):
        log(line)
    log(f"Report:    {out / 'demo_report.md'}  (stage report: {outputs['report']})")
    log(f"ROC plot:  {outputs['roc_png']}")
    log(f"Heatmap:   {outputs['heatmap_png']}")
    log(f"Summary:   {out / 'demo_summary.json'}")
    log(check)
    return 0 if ok else 1
