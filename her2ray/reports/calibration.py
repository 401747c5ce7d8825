"""Calibration: do predicted probabilities mean what they say?

A pathologist reading "p(3+) = 0.9" should be right about 9 times in 10. Discrimination metrics (AUC) do not
check that; reliability diagrams and the expected calibration error (ECE) do.

Conventions: equal-width bins on [0, 1]; bin ``b`` holds confidences in ``(lo, hi]`` and the first bin also
holds exactly 0. Top-label ECE (Guo et al., 2017) = sum over bins of ``n_b / n * |accuracy_b - confidence_b|``
where confidence is the top probability and accuracy whether the top class is the truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..labels import HER2_SCORES
from .metrics import validate_inputs


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # ceil(conf * n) - 1 puts conf in (lo, hi]; clip so 0 lands in bin 0 and 1 in the last bin.
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_bins(confidence: Any, correct: Any, n_bins: int = 10) -> list[dict[str, Any]]:
    """Per bin: ``lo``, ``hi``, ``count``, mean ``confidence`` and observed ``accuracy`` (``None`` if empty).

    ``confidence`` in [0, 1]; ``correct`` 0/1 (for top-label: prediction right; per class: truth is the class).
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.shape != hit.shape or conf.ndim != 1:
        raise ValueError("confidence and correct must be 1-D arrays of the same length")
    idx = _bin_index(conf, n_bins)
    bins = []
    for b in range(n_bins):
        sel = idx == b
        count = int(sel.sum())
        bins.append({
            "lo": b / n_bins,
            "hi": (b + 1) / n_bins,
            "count": count,
            "confidence": float(conf[sel].mean()) if count else None,
            "accuracy": float(hit[sel].mean()) if count else None,
        })
    return bins


def _ece_from_bins(bins: list[dict[str, Any]]) -> float:
    n = sum(b["count"] for b in bins)
    if n == 0:
        return 0.0
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 10) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins (0 = perfectly calibrated)."""
    y, p = validate_inputs(y_true, probs, np.asarray(probs).shape[-1])
    pred = np.argmax(p, axis=1)
    return _ece_from_bins(reliability_bins(p.max(axis=1), pred == y, n_bins))


def calibration_summary(y_true: Any, probs: Any, n_bins: int = 10,
                        class_names: tuple[str, ...] = HER2_SCORES) -> dict[str, Any]:
    """Everything a reliability diagram needs.

    Keys: ``ece`` (top-label), ``n_bins``, ``bins`` (top-label reliability bins), ``brier`` (multi-class
    Brier score: mean over slides of the squared distance to the one-hot truth, 0..2),
    ``per_class`` {name: {``ece``, ``bins``}} (one-vs-rest: p(class) against truth == class).
    """
    y, p = validate_inputs(y_true, probs, len(class_names))
    pred = np.argmax(p, axis=1)
    top = reliability_bins(p.max(axis=1), pred == y, n_bins)
    onehot = np.eye(len(class_names))[y]
    per_class = {}
    for k, name in enumerate(class_names):
        bins = reliability_bins(p[:, k], y == k, n_bins)
        per_class[name] = {"ece": _ece_from_bins(bins), "bins": bins}
    return {
        "ece": _ece_from_bins(top),
        "n_bins": int(n_bins),
        "bins": top,
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
        "per_class": per_class,
    }
