"""``her2ray train`` orchestration: inputs -> splits -> concurrent fold runs -> predictions, metrics, report.

Inputs are validated before any Ray work starts: labels go through the one HER2 parser (a bad value is a
``ManifestError`` naming file, row and column), slides that failed embedding or have no feature file are
excluded *and reported* (printed, ``excluded_slides.parquet``, ``run.json``, ``report.md``), and all
feature files must come from one encoder with one tile geometry (no silent mixing). A rerun of the same
command on the same ``--out`` resumes: the splits and protocol must be unchanged (else ``ConfigError``),
finished folds are skipped and unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from .. import console, storage
from ..errors import ConfigError, FeatureStoreError, Her2RayError, ManifestError
from ..features.schema import (META_KEY, RUN_FILE, FeatureFileMeta, feature_ids,
                               feature_url, is_usable, read_catalog)
from ..labels import NUM_CLASSES, PROB_COLUMNS, parse_her2_score, score_name
from ..manifest import load_manifest
from ..heartbeat import RunHeartbeat
from ..provenance import run_record, write_run_record
from ..ray_runtime import ensure_ray
from ..models import GRAPH_MODELS
from . import checkpoints as ck
from .config import RESOURCE_KEYS, TrainConfig
from .graphs import prebuild_graphs
from .determinism import compute_record
from .fold_check import check_fold_counts
from .loop import FoldSpec
from .postprocess import calibrated_columns, calibration_metrics, fit_postprocessing, postprocess_markdown
from .splits import SPLITS_FILE, TEST_FOLD, assign_folds, read_splits, write_splits

log = logging.getLogger(__name__)

EXCLUDED_FILE = "excluded_slides.parquet"
FAIL_HOOK_ENV = "HER2RAY_TEST_FAIL_AFTER_EPOCH"   # "fold:epochs" - test hook, see loop.FoldSpec
PID_HOOK_ENV = "HER2RAY_TEST_PID_DIR"             # local dir - test hook: fold workers leave a pid marker there
# Applied to the finished folds' predictions at the end of every run: a rerun with other values recomputes
# calibration and operating points without retraining.
POSTPROCESS_KEYS = {"calibration", "screening_endpoints", "screening_sensitivities"}


class TrainingFailedError(Her2RayError):
    """One or more folds failed; finished folds are kept and a rerun of the same command resumes."""

    exit_code = 1


# --------------------------------------------------------------------------------------- inputs
def load_labelled_manifest(url: str) -> list[dict[str, Any]]:
    """Manifest rows with ``label`` (0..3) parsed from ``her2_score``; ``patient_id`` defaults to slide id."""
    rows = load_manifest(url, required=("slide_id", "her2_score"), optional_float=())
    out = []
    for i, row in enumerate(rows, start=1):
        try:
            label = parse_her2_score(row.get("her2_score"))
        except ValueError as exc:
            raise ManifestError(str(exc), file=str(url), row=i, column="her2_score") from None
        out.append({"slide_id": row["slide_id"], "label": label,
                    "patient_id": str(row.get("patient_id") or row["slide_id"]),
                    "center": (str(row["center"]) if row.get("center") not in (None, "") else None)})
    return out


def check_availability(store: str, rows: list[dict[str, Any]], set_name: str
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split rows into usable and excluded (with a reason): catalog status not usable, or no feature file.

    ``skipped`` (reused by a resumed embed run) is as usable as ``ok``.
    """
    status: dict[str, tuple[str, str | None]] = {}
    catalog = read_catalog(store)
    if catalog is not None:
        status = {str(r["slide_id"]): (str(r.get("status")), r.get("error")) for r in catalog.to_pylist()}
    have = feature_ids(store)
    kept, excluded = [], []
    for r in rows:
        st, err = status.get(r["slide_id"], ("ok", None))
        if not is_usable(st):
            reason = f"embedding status {st}" + (f": {err}" if err else "")
        elif r["slide_id"] not in have:
            reason = "no feature file"
        else:
            kept.append(r)
            continue
        excluded.append({"slide_id": r["slide_id"], "set": set_name, "reason": reason})
    return kept, excluded


def feature_provenance(store: str, slide_ids: list[str]) -> dict[str, Any]:
    """Encoder identity and feature settings shared by every file; ``FeatureStoreError`` if they differ."""
    def meta(sid: str) -> FeatureFileMeta:
        url = feature_url(store, sid)
        raw = storage.read_parquet_metadata(url).get(META_KEY)
        if raw is None:
            raise FeatureStoreError(f"{url}: feature file has no her2ray metadata")
        return FeatureFileMeta.from_bytes(raw, url)

    with ThreadPoolExecutor(max_workers=16) as pool:
        metas = list(pool.map(meta, slide_ids))
    groups: dict[str, list[str]] = {}
    for m in metas:
        groups.setdefault(json.dumps(m.settings_key(), sort_keys=True), []).append(m.slide_id)
    if len(groups) > 1:
        detail = "; ".join(f"{len(ids)} slides (e.g. {ids[0]}) with {key}" for key, ids in groups.items())
        raise FeatureStoreError(f"{store}: feature files were made with different settings, refusing to mix: "
                                f"{detail}")
    first = metas[0]
    store_run = None
    run_url = storage.join(store, RUN_FILE)
    if storage.exists(run_url):
        store_run = json.loads(storage.read_text(run_url))
    return {"encoder": first.encoder, "patch_dim": int(first.encoder.get("dim")),
            "feature_settings": {**first.settings_key(), "tile_size_level0_px_example": first.tile_size_level0_px},
            "feature_store_run": store_run}


def select_sets(rows: list[dict[str, Any]], test_rows: list[dict[str, Any]], cfg: TrainConfig,
                manifest: str) -> tuple[list, list, list]:
    """``(cv rows, test rows, excluded)`` honouring external-validation centers."""
    excluded: list[dict[str, Any]] = []
    if cfg.train_centers is None:
        return rows, test_rows, excluded
    no_center = [r["slide_id"] for r in rows if not r.get("center")]
    if no_center:
        raise ManifestError(f"--train-centers/--test-centers need a center for every slide; empty for "
                            f"{no_center[:5]}", file=manifest, column="center")
    train_c, test_c = set(cfg.train_centers), set(cfg.test_centers or [])
    known = {r["center"] for r in rows}
    unknown = sorted((train_c | test_c) - known)
    if unknown:
        raise ConfigError(f"center(s) {unknown} not in the manifest (centers: {sorted(known)})")
    cv, test = [], list(test_rows)
    for r in rows:
        if r["center"] in train_c:
            cv.append(r)
        elif r["center"] in test_c:
            test.append(r)
        else:
            excluded.append({"slide_id": r["slide_id"], "set": "none",
                             "reason": f"center {r['center']} in neither train nor test centers"})
    return cv, test, excluded


def prepare_inputs(features: str, manifest: str, cfg: TrainConfig, test_manifest: str | None = None
                   ) -> dict[str, Any]:
    """Validated cohort: cv rows, test rows, excluded slides, feature provenance."""
    rows = load_labelled_manifest(manifest)
    test_rows = load_labelled_manifest(test_manifest) if test_manifest else []
    dup = {r["slide_id"] for r in rows} & {r["slide_id"] for r in test_rows}
    if dup:
        raise ManifestError(f"slide(s) {sorted(dup)[:5]} are in both the training and the test manifest",
                            file=test_manifest, column="slide_id")
    cv, test, excluded = select_sets(rows, test_rows, cfg, manifest)
    shared_patients = {r["patient_id"] for r in cv} & {r["patient_id"] for r in test}
    if shared_patients:
        raise ManifestError(f"patient(s) {sorted(shared_patients)[:5]} have slides in both the training and the "
                            "test set (leakage)", file=test_manifest or manifest, column="patient_id")
    cv, ex1 = check_availability(features, cv, "cv")
    test, ex2 = check_availability(features, test, "test")
    excluded += ex1 + ex2
    if not cv:
        raise FeatureStoreError(f"{features}: no usable training slide (excluded {len(excluded)})")
    check_fold_counts(cv, cfg.folds, cfg.split_by)      # before Ray starts, with counts per HER2 score
    prov = feature_provenance(features, [r["slide_id"] for r in cv + test])
    return {"cv": cv, "test": test, "excluded": excluded, "provenance": prov}


def report_excluded(excluded: list[dict[str, Any]]) -> None:
    if not excluded:
        return
    print(f"her2ray train: excluded {len(excluded)} slide(s):", file=console.stderr())
    for e in excluded:
        print(f"  {e['slide_id']} ({e['set']}): {e['reason']}", file=console.stderr())


# --------------------------------------------------------------------------------------- splits / specs
def make_or_check_splits(out: str, cv: list[dict[str, Any]], test: list[dict[str, Any]], cfg: TrainConfig
                         ) -> list[dict[str, Any]]:
    """Assign folds (reproducible from the seed); on resume the stored splits must be identical."""
    rows = assign_folds(cv, cfg.folds, cfg.seed, cfg.split_by)
    rows += [{**r, "fold": TEST_FOLD} for r in sorted(test, key=lambda r: r["slide_id"])]
    url = storage.join(out, SPLITS_FILE)
    if storage.exists(url):
        old = {(r["slide_id"], int(r["fold"])) for r in read_splits(url)}
        new = {(r["slide_id"], int(r["fold"])) for r in rows}
        if old != new:
            raise ConfigError(f"{url}: this run folder holds different splits (other slides, seed or split "
                              "settings); use a new --out")
    else:
        write_splits(rows, url)
    return rows


def check_resume_config(out: str, cfg: TrainConfig) -> None:
    """Refuse to continue a run folder made with another protocol (resources may change)."""
    url = storage.join(out, "run.json")
    if not storage.exists(url):
        return
    old = json.loads(storage.read_text(url)).get("config") or {}
    new = cfg.to_dict()
    free = RESOURCE_KEYS | POSTPROCESS_KEYS
    defaults = TrainConfig().to_dict()   # keys added by a newer her2ray at their defaults change nothing
    diff = sorted(k for k in set(old) | set(new)
                  if k not in free and old.get(k, defaults.get(k)) != new.get(k))
    if diff:
        raise ConfigError(f"{out}: run folder was made with a different configuration ({diff}); "
                          "use a new --out or the same settings to resume")


def build_fold_specs(out: str, split_rows: list[dict[str, Any]], features: str, cfg: TrainConfig,
                     provenance: dict[str, Any]) -> list[FoldSpec]:
    fail = os.environ.get(FAIL_HOOK_ENV)
    fail_fold, fail_epochs = (int(x) for x in fail.split(":")) if fail else (None, None)
    test = [r for r in split_rows if r["fold"] == TEST_FOLD]
    folds = sorted({r["fold"] for r in split_rows if r["fold"] != TEST_FOLD})
    prov = {"encoder": provenance["encoder"], "feature_settings": provenance["feature_settings"]}
    specs = []
    for k in folds:
        tr = [r for r in split_rows if r["fold"] not in (k, TEST_FOLD)]
        va = [r for r in split_rows if r["fold"] == k]
        specs.append(FoldSpec(
            fold=k, out_dir=ck.fold_dir(out, k), config=cfg.to_dict(), patch_dim=provenance["patch_dim"],
            seed=cfg.seed * 1000 + k,
            train_ids=[r["slide_id"] for r in tr], train_urls=[feature_url(features, r["slide_id"]) for r in tr],
            train_labels=[int(r["label"]) for r in tr],
            val_ids=[r["slide_id"] for r in va], val_urls=[feature_url(features, r["slide_id"]) for r in va],
            val_labels=[int(r["label"]) for r in va],
            test_ids=[r["slide_id"] for r in test], test_urls=[feature_url(features, r["slide_id"]) for r in test],
            test_labels=[int(r["label"]) for r in test], provenance=prov,
            fail_after_epoch=fail_epochs if fail_fold == k else None,
            pid_marker_dir=os.environ.get(PID_HOOK_ENV) or None))
    return specs


# --------------------------------------------------------------------------------------- ray
def check_cluster_resources(cfg: TrainConfig) -> None:
    """Fail fast instead of waiting forever: one fold worker must fit ONE live node, or a node type the
    cluster's autoscaler can add (``her2ray.resources``)."""
    from ..resources import check_fits, cluster_shapes

    check_fits({"CPU": cfg.cpus_per_fold, "GPU": cfg.gpus_per_fold}, cluster_shapes(), what="a training fold",
               hint="Lower --cpus-per-fold / --gpus-per-fold, or use a cluster with such a node (--address).")


# --------------------------------------------------------------------------------------- outputs
def _pred_scores(probs: np.ndarray) -> list[str]:
    return [score_name(i) for i in np.argmax(probs, axis=1)] if len(probs) else []


def oof_table(split_rows, fold_preds: dict[int, pa.Table]) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    meta = {r["slide_id"]: r for r in split_rows}
    recs = []
    for k, t in sorted(fold_preds.items()):
        recs += t.to_pylist()
    recs.sort(key=lambda r: r["slide_id"])
    probs = np.array([[r[c] for c in PROB_COLUMNS] for r in recs], dtype=np.float64).reshape(-1, NUM_CLASSES)
    y = np.array([meta[r["slide_id"]]["label"] for r in recs], dtype=np.int64)
    cols = {"slide_id": [r["slide_id"] for r in recs],
            "patient_id": [meta[r["slide_id"]].get("patient_id") for r in recs],
            "center": [meta[r["slide_id"]].get("center") for r in recs],
            "fold": pa.array([int(r["fold"]) for r in recs], pa.int64()),
            "her2_score": [score_name(v) for v in y]}
    for j, c in enumerate(PROB_COLUMNS):
        cols[c] = pa.array(probs[:, j], pa.float64())
    cols["pred_score"] = _pred_scores(probs)
    return pa.table(cols), y, probs


def test_table(split_rows, fold_preds: dict[int, pa.Table]) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """``(table, labels, raw fold probabilities [F, n, C])``; the table's ``prob_her2_*`` are the raw mean."""
    test = sorted((r for r in split_rows if r["fold"] == TEST_FOLD), key=lambda r: r["slide_id"])
    ids = [r["slide_id"] for r in test]
    cols: dict[str, Any] = {"slide_id": ids, "patient_id": [r.get("patient_id") for r in test],
                            "center": [r.get("center") for r in test],
                            "her2_score": [score_name(r["label"]) for r in test]}
    stack = []
    for k, t in sorted(fold_preds.items()):
        by_id = {r["slide_id"]: r for r in t.to_pylist()}
        p = np.array([[by_id[s][c] for c in PROB_COLUMNS] for s in ids], dtype=np.float64).reshape(-1, NUM_CLASSES)
        stack.append(p)
        for j, c in enumerate(PROB_COLUMNS):
            cols[f"fold{k}_{c}"] = pa.array(p[:, j], pa.float64())
    mean = np.mean(stack, axis=0)
    for j, c in enumerate(PROB_COLUMNS):
        cols[c] = pa.array(mean[:, j], pa.float64())
    cols["prob_std_max"] = pa.array(np.std(stack, axis=0).max(axis=1), pa.float64())
    cols["pred_score"] = _pred_scores(mean)
    return pa.table(cols), np.array([r["label"] for r in test], dtype=np.int64), np.asarray(stack)


def write_outputs(out: str, cfg: TrainConfig, split_rows, results: dict[int, dict[str, Any]],
                  inputs: dict[str, Any]) -> dict[str, Any]:
    """OOF/test predictions, metrics.json, PNGs and report.md from the finished folds' files."""
    from ..reports import markdown, plots
    from ..reports.metrics import classification_metrics, summarize_folds
    from ..reports.screening import screening_summary

    folds = sorted(results)
    val_preds = {k: storage.read_parquet(storage.join(ck.fold_dir(out, k), ck.VAL_PRED_FILE)) for k in folds}
    oof, oy, op_raw = oof_table(split_rows, val_preds)
    cal, points = fit_postprocessing(out, cfg, oy, op_raw, np.asarray(oof.column("fold").to_pylist()))
    op = cal.apply(op_raw)
    oof = calibrated_columns(oof, op_raw, op, points)
    storage.write_parquet_atomic(oof, storage.join(out, "oof_predictions.parquet"))
    metrics: dict[str, Any] = {
        "model": cfg.model, "split_by": cfg.split_by, "n_folds": len(folds), "seed": cfg.seed,
        "folds": [{"fold": k, "val": results[k]["val_metrics"], "test": results[k].get("test_metrics"),
                   "best_epoch": results[k]["best_epoch"], "epochs_run": results[k]["epochs_run"],
                   "stopped_early": results[k]["stopped_early"], "n_train": results[k]["n_train"],
                   "n_val": results[k]["n_val"]} for k in folds],
        "val": summarize_folds([results[k]["val_metrics"] for k in folds]),
        "oof": classification_metrics(oy, op),
        "test": None, "test_ensemble": None,
        "excluded": inputs["excluded"],
        "compute": compute_record(cfg.torch_threads, cfg.deterministic, results[folds[0]].get("device", "cpu")),
        "calibration": {**cal.to_dict(), "test": None},
        "operating_points": points,
    }
    images = {}
    plots.roc_curves_png(oy, op, storage.join(out, "roc_oof.png"), title="Out-of-fold ROC (validation folds)")
    plots.confusion_png(metrics["oof"]["confusion_matrix"], storage.join(out, "confusion_oof.png"),
                        title="Out-of-fold confusion")
    plots.training_curves_png({k: results[k]["history"] for k in folds}, storage.join(out, "training_curves.png"))
    images.update({"Out-of-fold ROC": "roc_oof.png", "Out-of-fold confusion matrix": "confusion_oof.png",
                   "Training curves": "training_curves.png"})
    test_rows = [r for r in split_rows if r["fold"] == TEST_FOLD]
    if test_rows:
        test_preds = {k: storage.read_parquet(storage.join(ck.fold_dir(out, k), ck.TEST_PRED_FILE)) for k in folds}
        tt, ty, stack = test_table(split_rows, test_preds)
        tp_raw, tp = stack.mean(axis=0), cal.apply_ensemble(stack)
        tt = calibrated_columns(tt, tp_raw, tp, points)
        storage.write_parquet_atomic(tt, storage.join(out, "test_predictions.parquet"))
        metrics["test"] = summarize_folds([results[k]["test_metrics"] for k in folds])
        metrics["test_ensemble"] = classification_metrics(ty, tp)
        cal_test = calibration_metrics(cal, ty, tp_raw, tp)
        metrics["calibration"]["test"] = {"before": cal_test["before"], "after": cal_test["after"]}
        test_rows_sorted = sorted(test_rows, key=lambda r: r["slide_id"])
        screened = screening_summary(ty, {c: tt.column(c).to_numpy(zero_copy_only=False) for c in tt.column_names},
                                     [r.get("patient_id") or r["slide_id"] for r in test_rows_sorted], seed=cfg.seed)
        by_col = {s_["column"]: s_ for s_ in screened}
        metrics["operating_points"] = [{**op_, "test": by_col.get(op_["column"])} for op_ in points]
        plots.calibration_png(cal_test["summary_before"], storage.join(out, "reliability_test_uncalibrated.png"),
                              title="Test reliability, uncalibrated")
        plots.calibration_png(cal_test["summary_after"], storage.join(out, "reliability_test.png"),
                              title=f"Test reliability, calibrated ({cal.method})")
        images.update({"Test reliability, uncalibrated": "reliability_test_uncalibrated.png",
                       "Test reliability, calibrated": "reliability_test.png"})
        plots.roc_curves_png(ty, tp, storage.join(out, "roc_test.png"), title="Test ROC (fold ensemble)")
        plots.confusion_png(metrics["test_ensemble"]["confusion_matrix"], storage.join(out, "confusion_test.png"),
                            title="Test confusion (fold ensemble)")
        images.update({"Test ROC (fold ensemble)": "roc_test.png", "Test confusion (fold ensemble)":
                       "confusion_test.png"})
    storage.write_text_atomic(storage.join(out, "metrics.json"),
                              json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")
    notes = [f"Model {cfg.model}; {len(folds)} folds split by {cfg.split_by} (seed {cfg.seed}); early stopping "
             f"on validation macro AUC (patience {cfg.patience}, max {cfg.max_epochs} epochs).",
             "Out-of-fold numbers come from the same validation folds used for early stopping, so they are "
             "optimistic; the held-out test set (when given) is the unbiased estimate."]
    notes += [f"Probabilities are post-hoc calibrated ({cal.method}; calibration.json), fitted on the out-of-fold "
              "predictions; the out-of-fold metrics therefore use an in-sample calibration."]
    notes += [f"Excluded slide {e['slide_id']} ({e['set']}): {e['reason']}" for e in inputs["excluded"]]
    text = markdown.render_report(metrics["oof"], title=f"HER2 {cfg.model.upper()} cross-validation",
                                  fold_summary=metrics["val"], images=images, notes=notes,
                                  provenance={"encoder": inputs["provenance"]["encoder"],
                                              "feature_settings": inputs["provenance"]["feature_settings"]})
    text += "\n\n## Folds\n\n| Fold | Train | Val | Best epoch | Epochs run | Early stop | Val macro AUC | Test macro AUC |\n"
    text += "|---|---|---|---|---|---|---|---|\n"
    for f in metrics["folds"]:
        auc = (f["val"] or {}).get("auc_macro_ovr")
        tauc = (f["test"] or {}).get("auc_macro_ovr")
        text += (f"| {f['fold']} | {f['n_train']} | {f['n_val']} | {f['best_epoch']} | {f['epochs_run']} | "
                 f"{'yes' if f['stopped_early'] else 'no'} | {markdown.fmt(auc)} | {markdown.fmt(tauc)} |\n")
    if metrics["test_ensemble"]:
        text += "\n\n" + markdown.render_report(metrics["test_ensemble"], title="Held-out test set (fold ensemble)",
                                                fold_summary=metrics["test"]).replace("# Held", "## Held", 1)
    text += "\n\n" + postprocess_markdown(metrics)
    markdown.write_report(storage.join(out, "report.md"), text)
    return metrics


def train_timing(results: dict[int, dict[str, Any]], t0: float, t_ray: float, t_folds: float, t_end: float
                 ) -> dict[str, float]:
    """Where the wall time went (epoch seconds in, seconds out): ``prepare_s`` (inputs, splits), ``ray_start_s``,
    ``fold_startup_s`` (Ray Train workers up until the first fold's loop began), ``training_s`` (first fold
    loop began -> last fold done), ``outputs_s`` (metrics, plots, report)."""
    ran = [r for r in results.values() if not r.get("skipped")]
    timing = {"prepare_s": t_ray - t0, "ray_start_s": t_folds - t_ray}
    if ran:
        first = min(float(r["started_at"]) for r in ran)
        last = max(float(r["finished_at"]) for r in ran)
        timing.update(fold_startup_s=max(0.0, first - t_folds), training_s=max(0.0, last - first),
                      outputs_s=max(0.0, t_end - last))
    return {k: round(v, 2) for k, v in timing.items()}


# --------------------------------------------------------------------------------------- entry point
def train_cv(features: str, manifest: str, out: str, cfg: TrainConfig, test_manifest: str | None = None,
             local: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole cross-validation; returns a summary dict. See module docstring."""
    from .folds import run_folds

    t0 = time.time()
    check_resume_config(out, cfg)
    inputs = prepare_inputs(features, manifest, cfg, test_manifest)
    report_excluded(inputs["excluded"])
    storage.makedirs(out)
    storage.write_parquet_atomic(pa.Table.from_pylist(
        inputs["excluded"], schema=pa.schema([("slide_id", pa.string()), ("set", pa.string()),
                                              ("reason", pa.string())])), storage.join(out, EXCLUDED_FILE))
    split_rows = make_or_check_splits(out, inputs["cv"], inputs["test"], cfg)
    specs = build_fold_specs(out, split_rows, features, cfg, inputs["provenance"])
    prov = inputs["provenance"]
    record_extra = {"inputs": {"features": features, "manifest": manifest, "test_manifest": test_manifest},
                    "encoder": prov["encoder"], "feature_settings": prov["feature_settings"],
                    "feature_store_run": prov["feature_store_run"], "n_cv": len(inputs["cv"]),
                    "n_test": len(inputs["test"]), "excluded": inputs["excluded"], "folds": [s.fold for s in specs]}
    heart = RunHeartbeat(storage.join(out, "run.json"), run_record("train", cfg.to_dict(), status="running",
                                                                    **record_extra))
    with heart:                       # run.json: start, host, pid + a heartbeat, so a dead run is visible
        t_ray = time.time()
        started_ray = False if local else ensure_ray(cfg.address)
        t_folds = time.time()
        try:
            if not local:
                check_cluster_resources(cfg)
            if cfg.model in GRAPH_MODELS:   # SlideGraph+: every slide graph once, not once per fold
                prebuild_graphs([u for s in specs[:1] for u in s.train_urls + s.val_urls + s.test_urls],
                                cfg.graph_settings(), local)
            results, errors = run_folds(specs, storage.join(out, ck.FOLDS_DIR), cfg.max_concurrent_folds, local)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    if errors:
        write_run_record(storage.join(out, "run.json"), heart.final(**run_record(
            "train", cfg.to_dict(), status="failed", fold_errors=errors, **record_extra)))
        raise TrainingFailedError(
            f"{len(errors)} fold(s) failed ({', '.join(f'fold {k}: {v}' for k, v in sorted(errors.items()))}); "
            f"{len(results)} finished. Rerun the same command to resume.")
    metrics = write_outputs(out, cfg, split_rows, results, inputs)
    summary = {"out": out, "folds": {k: {"best_epoch": r["best_epoch"], "start_epoch": r["start_epoch"],
                                         "epochs_run": r["epochs_run"], "skipped": r.get("skipped", False),
                                         "started_at": r["started_at"], "finished_at": r["finished_at"],
                                         "val_auc": r["best_val_auc"]} for k, r in sorted(results.items())},
               "val_auc_mean": metrics["val"]["auc_macro_ovr"]["mean"],
               "oof_auc": metrics["oof"]["auc_macro_ovr"],
               "test_auc": (metrics["test_ensemble"] or {}).get("auc_macro_ovr"),
               "excluded": inputs["excluded"], "seconds": time.time() - t0,
               "timing": train_timing(results, t0, t_ray, t_folds, time.time())}
    write_run_record(storage.join(out, "run.json"), heart.final(**run_record(
        "train", cfg.to_dict(), status="done", summary=summary, **record_extra)))
    return summary
