"""After the folds: calibration and screening operating points from the OOF predictions, applied to tables.

``run.write_outputs`` calls :func:`fit_postprocessing` once on the pooled out-of-fold predictions, saves the
map (``calibration.json``) and thresholds (``operating_points.json``) in the run folder (the scorer applies
the very same files), and rewrites every prediction table with :func:`calibrated_columns`: ``prob_her2_*``
calibrated, ``prob_uncal_her2_*`` raw, ``pred_score`` from the calibrated probabilities and one
``screen_*`` flag per operating point. Model-agnostic: only probabilities go in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ..labels import PROB_COLUMNS, UNCAL_PROB_COLUMNS, score_name
from ..reports.calibration import calibration_summary
from .calibration import Calibration, fit_calibration, save_calibration
from .config import TrainConfig
from .operating_points import apply_operating_points, fit_operating_points, save_operating_points


def fit_postprocessing(out: str, cfg: TrainConfig, labels: np.ndarray, raw_probs: np.ndarray,
                       folds: np.ndarray) -> tuple[Calibration, list[dict[str, Any]]]:
    """Fit calibration (``cfg.calibration``) then thresholds on the calibrated OOF probabilities; save both."""
    cal = fit_calibration(raw_probs, labels, folds, method=cfg.calibration)
    points = fit_operating_points(labels, cal.apply(raw_probs), cfg.screening_endpoints,
                                  cfg.screening_sensitivities)
    save_calibration(out, cal)
    save_operating_points(out, points)
    return cal, points


def calibrated_columns(table: pa.Table, raw: np.ndarray, calibrated: np.ndarray,
                       points: list[dict[str, Any]]) -> pa.Table:
    """``table`` with calibrated ``prob_her2_*`` (same position), raw ``prob_uncal_her2_*``, ``pred_score``
    from the calibrated argmax and the operating points' flag columns appended."""
    for j, (c, u) in enumerate(zip(PROB_COLUMNS, UNCAL_PROB_COLUMNS)):
        table = table.set_column(table.schema.get_field_index(c), c, pa.array(calibrated[:, j], pa.float64()))
        table = table.append_column(u, pa.array(raw[:, j], pa.float64()))
    if "pred_score" in table.column_names:
        pred = [score_name(i) for i in np.argmax(calibrated, axis=1)] if len(calibrated) else []
        table = table.set_column(table.schema.get_field_index("pred_score"), "pred_score", pa.array(pred, pa.string()))
    for column, flags in apply_operating_points(points, calibrated).items():
        table = table.append_column(column, pa.array(flags, pa.bool_()))
    return table


def calibration_metrics(cal: Calibration, labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray,
                        n_bins: int = 10) -> dict[str, Any]:
    """ECE and Brier before/after on a labelled set (e.g. the held-out test set), plus the map itself."""
    before, after = calibration_summary(labels, raw, n_bins), calibration_summary(labels, calibrated, n_bins)
    return {"before": {"ece": before["ece"], "brier": before["brier"]},
            "after": {"ece": after["ece"], "brier": after["brier"]},
            "summary_before": before, "summary_after": after}


def postprocess_markdown(metrics: dict[str, Any]) -> str:
    """report.md sections of a training run: calibration before/after and the screening operating points."""
    from ..reports.screening import calibration_change_markdown, screening_markdown

    cal = metrics.get("calibration") or {}
    fit = cal.get("fit") or {}
    text = ""
    if fit:
        text += calibration_change_markdown(fit["oof_before"], fit["oof_after"], cal.get("method", ""))
        text += "\nOut of fold (in-sample for the calibration map). CV NLL per family: " + ", ".join(
            f"{k} {v:.4f}" for k, v in (fit.get("cv_nll") or {}).items() if v is not None) + ".\n"
    if cal.get("test"):
        text += "\n" + calibration_change_markdown(cal["test"]["before"], cal["test"]["after"], "held-out test set",
                                                   heading="###")
    text += "\n" + screening_markdown(metrics.get("operating_points") or [])
    return text
