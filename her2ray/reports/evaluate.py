"""Evaluate scoring output against labels: the engine behind ``her2ray evaluate``.

Inputs are validated at the boundary (every error names the file, the 1-based data row and the column), then
predictions and labels are matched by ``slide_id``. Slides present on one side only are *reported* (counts
and ids in metrics.json and report.md), never dropped silently. A manifest row with an empty ``her2_score``
is an unlabelled slide (reported too); a non-empty value that is not a HER2 score is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import storage
from ..errors import ManifestError
from ..labels import HER2_SCORES, PROB_COLUMNS, UNCAL_PROB_COLUMNS, parse_her2_score
from ..manifest import read_table, validate_slide_id
from ..provenance import run_record
from .bootstrap import DEFAULT_METRIC_KEYS, bootstrap_ci
from .calibration import calibration_summary
from .markdown import render_report, write_report
from .metrics import classification_metrics, predict
from .plots import calibration_png, confusion_png, per_center_png, roc_curves_png
from .screening import calibration_change_markdown, parse_column, screening_markdown, screening_summary

log = logging.getLogger(__name__)

SUM_TOLERANCE = 1e-2  # float16-stored probabilities sum to 1 within ~2e-3; logits or percentages do not
MISSING_CENTER = "(missing)"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value.strip() == "")


@dataclass
class Predictions:
    """Validated scoring output: one row per slide with a probability vector."""

    url: str
    slide_ids: list[str]
    probs: np.ndarray  # [n, 4] float64, rows renormalised to sum to exactly 1
    pred_score: list[int | None]
    unscored: list[str] = field(default_factory=list)  # rows whose four probabilities are all empty
    probs_uncal: np.ndarray | None = None  # prob_uncal_her2_* when the file has them (calibrated scoring)
    flags: dict[str, np.ndarray] = field(default_factory=dict)  # screen_* operating-point columns, bool [n]


@dataclass
class Labels:
    """Validated labelled manifest."""

    url: str
    label: dict[str, int]
    patient: dict[str, str]
    center: dict[str, str | None]
    unlabelled: list[str] = field(default_factory=list)


def _require_columns(columns: list[str], required: tuple[str, ...], url: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ManifestError(f"missing required column(s) {missing}; found {columns}", file=url,
                            column=missing[0])


def load_predictions(url: str, tolerance: float = SUM_TOLERANCE) -> Predictions:
    """Read and validate a scoring output (Parquet or CSV): ids, probabilities in [0, 1] summing to ~1."""
    url = str(url)
    table = read_table(url)
    _require_columns(table.column_names, ("slide_id", *PROB_COLUMNS), url)
    rows = table.to_pylist()
    if not rows:
        raise ManifestError("predictions table has no rows", file=url)
    seen: dict[str, int] = {}
    ids, probs, preds, unscored, uncal = [], [], [], [], []
    has_uncal = all(c in table.column_names for c in UNCAL_PROB_COLUMNS)
    flag_cols = [c for c in table.column_names if parse_column(c) is not None]
    flags: dict[str, list[bool]] = {c: [] for c in flag_cols}
    for i, row in enumerate(rows, start=1):
        sid = validate_slide_id(row.get("slide_id"), file=url, row=i)
        if sid in seen:
            raise ManifestError(f"duplicate slide id {sid!r} (first seen in row {seen[sid]}); one row per slide "
                                "expected (average fold predictions first)", file=url, row=i, column="slide_id")
        seen[sid] = i
        raw = [row.get(c) for c in PROB_COLUMNS]
        if all(_missing(v) for v in raw):
            unscored.append(sid)
            continue
        vec = _prob_vector(row, PROB_COLUMNS, url, i, tolerance)
        if has_uncal:
            uncal.append(_prob_vector(row, UNCAL_PROB_COLUMNS, url, i, tolerance))
        for col in flag_cols:
            flags[col].append(_flag(row.get(col), url, i, col))
        pred = None
        if "pred_score" in row and not _missing(row.get("pred_score")):
            try:
                pred = parse_her2_score(row["pred_score"])
            except ValueError as exc:
                raise ManifestError(str(exc), file=url, row=i, column="pred_score") from None
        ids.append(sid)
        probs.append(vec)
        preds.append(pred)
    return Predictions(url=url, slide_ids=ids, probs=np.asarray(probs, dtype=np.float64).reshape(-1, 4),
                       pred_score=preds, unscored=unscored,
                       probs_uncal=np.asarray(uncal, dtype=np.float64).reshape(-1, 4) if has_uncal else None,
                       flags={c: np.asarray(v, dtype=bool) for c, v in flags.items()})


def _prob_vector(row: dict[str, Any], columns: tuple[str, ...], url: str, i: int, tolerance: float) -> list[float]:
    """Four probabilities of one row, validated (numbers in [0, 1] summing to ~1) and renormalised."""
    vec = []
    for col in columns:
        value = row.get(col)
        if _missing(value):
            raise ManifestError("empty probability (all four must be given, or none for a failed slide)",
                                file=url, row=i, column=col)
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ManifestError(f"probability must be a number, got {value!r}", file=url, row=i,
                                column=col) from None
        if not (math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6):
            raise ManifestError(f"probability must be in [0, 1], got {value!r}", file=url, row=i, column=col)
        vec.append(min(max(v, 0.0), 1.0))
    total = sum(vec)
    if abs(total - 1.0) > tolerance:
        raise ManifestError(f"probabilities sum to {total:.4f}, expected 1 (+/- {tolerance}); are these "
                            "logits or percentages?", file=url, row=i, column=",".join(columns))
    return [v / total for v in vec]


def _flag(value: Any, url: str, i: int, column: str) -> bool:
    """A screening flag cell: a boolean, or true/false/1/0 text (CSV)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower() if value is not None else ""
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise ManifestError(f"screening flag must be true or false, got {value!r}", file=url, row=i, column=column)


def load_labels(url: str) -> Labels:
    """Read and validate a labelled manifest: ``slide_id``, ``her2_score``, optional ``patient_id``, ``center``."""
    url = str(url)
    table = read_table(url)
    _require_columns(table.column_names, ("slide_id", "her2_score"), url)
    rows = table.to_pylist()
    if not rows:
        raise ManifestError("manifest has no rows", file=url)
    out = Labels(url=url, label={}, patient={}, center={})
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=1):
        sid = validate_slide_id(row.get("slide_id"), file=url, row=i)
        if sid in seen:
            raise ManifestError(f"duplicate slide id {sid!r} (first seen in row {seen[sid]})", file=url, row=i,
                                column="slide_id")
        seen[sid] = i
        value = row.get("her2_score")
        if _missing(value):
            out.unlabelled.append(sid)
            continue
        try:
            out.label[sid] = parse_her2_score(value.strip() if isinstance(value, str) else value)
        except ValueError as exc:
            raise ManifestError(str(exc), file=url, row=i, column="her2_score") from None
        patient = row.get("patient_id")
        out.patient[sid] = sid if _missing(patient) else str(patient).strip()
        center = row.get("center")
        out.center[sid] = None if _missing(center) else str(center).strip()
    return out


def _sha256(url: str) -> str | None:
    try:
        return hashlib.sha256(storage.read_bytes(url)).hexdigest()
    except Exception:  # noqa: BLE001 - provenance must not fail the evaluation
        return None


def _metrics_with_ci(y: np.ndarray, p: np.ndarray, groups: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    metrics = classification_metrics(y, p)
    metrics["bootstrap_ci"] = bootstrap_ci(y, p, groups, DEFAULT_METRIC_KEYS, n_boot=n_boot, seed=seed)
    return metrics


def evaluate_predictions(predictions_url: str, manifest_url: str, out_url: str, *, n_boot: int = 1000,
                         seed: int = 0, n_bins: int = 10, title: str = "HER2 scoring evaluation",
                         make_plots: bool = True) -> dict[str, Any]:
    """Compute metrics, CIs, calibration and per-center results; write metrics.json, report.md and PNGs.

    Returns the dict written to ``<out>/metrics.json``: the keys of :func:`classification_metrics` plus
    ``bootstrap_ci`` {key: {estimate, lo, hi, n_valid, n_boot}}, ``bootstrap`` (settings), ``calibration``
    (:func:`calibration_summary`), ``per_center`` {center: metrics + bootstrap_ci} (only when the manifest
    has centers), ``matching`` (counts and ids of slides on one side only), ``outputs`` and ``provenance``.
    ``make_plots=False`` skips the PNGs (metrics-only runs, e.g. many cohorts in a loop).
    """
    if n_boot < 1:
        raise ManifestError("--n-boot must be >= 1")
    preds = load_predictions(predictions_url)
    labels = load_labels(manifest_url)

    pred_index = {sid: i for i, sid in enumerate(preds.slide_ids)}
    evaluated = [sid for sid in preds.slide_ids if sid in labels.label]
    matching = {
        "n_predictions": len(preds.slide_ids) + len(preds.unscored),
        "n_labelled": len(labels.label),
        "n_evaluated": len(evaluated),
        "predictions_without_label": [s for s in preds.slide_ids if s not in labels.label],
        "labels_without_prediction": [s for s in labels.label if s not in pred_index],
        "unscored_predictions": list(preds.unscored),
        "unlabelled_in_manifest": list(labels.unlabelled),
    }
    if not evaluated:
        raise ManifestError(f"no slide of the predictions has a label in {labels.url} "
                            f"({len(preds.slide_ids)} predicted, {len(labels.label)} labelled; check slide ids)",
                            file=preds.url, column="slide_id")

    rows = [pred_index[s] for s in evaluated]
    y = np.asarray([labels.label[s] for s in evaluated], dtype=np.int64)
    p = preds.probs[rows]
    groups = [labels.patient[s] for s in evaluated]
    notes: list[str] = []
    for key, label in (("predictions_without_label", "predicted slides have no label"),
                       ("labels_without_prediction", "labelled slides have no prediction"),
                       ("unscored_predictions", "prediction rows have no probabilities (failed scoring)")):
        if matching[key]:
            notes.append(f"{len(matching[key])} {label} and were not evaluated (ids in metrics.json)")
    given = [(preds.pred_score[i], int(a)) for i, a in zip(rows, predict(p)) if preds.pred_score[i] is not None]
    disagree = sum(1 for g, a in given if g != a)
    if disagree:
        notes.append(f"pred_score differs from argmax of the probabilities on {disagree} slide(s); metrics use "
                     "the argmax")

    result = _metrics_with_ci(y, p, groups, n_boot, seed)
    result["notes"] = notes + result["notes"]
    result["bootstrap"] = {"method": "percentile", "unit": "patients", "n_boot": int(n_boot), "seed": int(seed),
                           "alpha": 0.05, "n_patients": len(set(groups))}
    result["calibration"] = calibration_summary(y, p, n_bins=n_bins)
    extra_md = ""
    if preds.probs_uncal is not None:
        before = calibration_summary(y, preds.probs_uncal[rows], n_bins=n_bins)
        result["calibration_uncalibrated"] = before
        result["calibration_change"] = {
            "before": {"ece": before["ece"], "brier": before["brier"]},
            "after": {"ece": result["calibration"]["ece"], "brier": result["calibration"]["brier"]}}
        extra_md += calibration_change_markdown(result["calibration_change"]["before"],
                                                result["calibration_change"]["after"], "before and after")
    if preds.flags:
        result["screening"] = screening_summary(y, {c: v[rows] for c, v in preds.flags.items()}, groups,
                                                n_boot=n_boot, seed=seed)
        extra_md += "\n" + screening_markdown(result["screening"])
    result["matching"] = matching

    centers = [labels.center[s] for s in evaluated]
    per_center: dict[str, Any] = {}
    if any(c is not None for c in centers):
        names = np.asarray([c if c is not None else MISSING_CENTER for c in centers], dtype=object)
        for center in sorted(set(names)):
            sel = np.flatnonzero(names == center)
            per_center[center] = _metrics_with_ci(y[sel], p[sel], [groups[i] for i in sel], n_boot, seed)
        result["per_center"] = per_center

    out_url = str(out_url)
    storage.makedirs(out_url)
    images: dict[str, str] = {}
    if make_plots:
        roc_curves_png(y, p, storage.join(out_url, "roc.png"))
        confusion_png(result["confusion_matrix"], storage.join(out_url, "confusion.png"))
        calibration_png(result["calibration"], storage.join(out_url, "calibration.png"))
        images = {"One-vs-rest ROC per class": "roc.png", "Confusion matrix": "confusion.png",
                  "Reliability diagram": "calibration.png"}
        if "calibration_uncalibrated" in result:
            calibration_png(result["calibration_uncalibrated"], storage.join(out_url, "calibration_uncalibrated.png"),
                            title="Reliability diagram, uncalibrated (prob_uncal_her2_*)")
            images["Reliability diagram before calibration"] = "calibration_uncalibrated.png"
        if per_center:
            per_center_png(per_center, storage.join(out_url, "per_center.png"))
            images["Metrics per center"] = "per_center.png"
    result["outputs"] = {"metrics": "metrics.json", "report": "report.md", "images": list(images.values())}

    result["provenance"] = run_record(
        "evaluate",
        {"n_boot": int(n_boot), "seed": int(seed), "n_bins": int(n_bins), "sum_tolerance": SUM_TOLERANCE,
         "bootstrap_metric_keys": list(DEFAULT_METRIC_KEYS)},
        inputs={"predictions": {"url": preds.url, "sha256": _sha256(preds.url)},
                "manifest": {"url": labels.url, "sha256": _sha256(labels.url)}},
        class_names=list(HER2_SCORES),
    )
    storage.write_text_atomic(storage.join(out_url, "metrics.json"),
                              json.dumps(result, indent=2, allow_nan=False) + "\n")
    text = render_report(result, title=title, bootstrap_ci=result["bootstrap_ci"],
                         bootstrap_settings=result["bootstrap"], calibration=result["calibration"],
                         per_center=per_center or None, matching=matching, images=images,
                         provenance={k: result["provenance"][k] for k in ("created_utc", "versions", "config",
                                                                          "inputs")})
    write_report(storage.join(out_url, "report.md"), text + ("\n" + extra_md if extra_md else ""))
    log.info("evaluated %d slides -> %s", len(evaluated), out_url)
    return result
