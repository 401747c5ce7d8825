"""Screening operating points: thresholds on an endpoint score that reach a target sensitivity out of fold.

A screening lab asks "flag every slide that may be HER2-low, and miss at most 5 %". That is a threshold on
the endpoint score of ``reports.metrics.ENDPOINTS`` (e.g. ``her2_0_vs_low``: (p1+ + p2+) / (p0 + p1+ + p2+)
on the calibrated probabilities) chosen so that the sensitivity on the out-of-fold predictions is at least
the target. Rule: the *highest* threshold whose OOF sensitivity reaches the target (``score >= threshold``
flags a slide), i.e. the k-th highest positive score with ``k = ceil(target * n_positive)``; the highest
such threshold gives the best specificity for that sensitivity on these data.

Out-of-fold sensitivity meets the target by construction; on new slides it is an estimate, so ``evaluate``
reports the test sensitivity with patient-level bootstrap CIs next to the target. Every operating point
becomes one boolean column ``screen_<endpoint>_sens<percent>`` in ``score`` output (True = flagged).
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np

from .. import storage
from ..errors import ConfigError
from ..reports.metrics import ENDPOINTS, endpoint_scores
from ..reports.screening import COLUMN_PREFIX, column_name, endpoint_score_all, parse_column, sens_spec

OPERATING_POINTS_FILE = "operating_points.json"
DEFAULT_ENDPOINTS: tuple[str, ...] = ("her2_0_vs_low", "her2_low_vs_positive")
DEFAULT_SENSITIVITIES: tuple[float, ...] = (0.90, 0.95)


def pick_threshold(y_bin: np.ndarray, score: np.ndarray, target: float) -> float | None:
    """Highest threshold t with sensitivity(score >= t) >= target; None without positive slides."""
    pos_scores = np.sort(np.asarray(score, dtype=np.float64)[np.asarray(y_bin).astype(bool)])[::-1]
    if pos_scores.size == 0:
        return None
    k = max(1, math.ceil(round(target * pos_scores.size, 9)))
    return float(pos_scores[min(k, pos_scores.size) - 1])


def fit_operating_points(labels: np.ndarray, probs: np.ndarray,
                         endpoints: Sequence[str] = DEFAULT_ENDPOINTS,
                         sensitivities: Sequence[float] = DEFAULT_SENSITIVITIES) -> list[dict[str, Any]]:
    """One record per (endpoint, target): threshold and the OOF sensitivity/specificity it achieves."""
    y = np.asarray(labels, dtype=np.int64)
    out = []
    for ep in endpoints:
        if ep not in ENDPOINTS:
            raise ConfigError(f"unknown screening endpoint {ep!r}; endpoints are {list(ENDPOINTS)}")
        y_bin, score = endpoint_scores(ep, y, np.asarray(probs, dtype=np.float64))
        for target in sensitivities:
            if not 0.0 < float(target) < 1.0:
                raise ConfigError(f"target sensitivity must be in (0, 1), got {target}")
            t = pick_threshold(y_bin, score, float(target))
            sens, spec = (None, None) if t is None else sens_spec(y_bin, score >= t)
            out.append({"name": column_name(ep, target)[len(COLUMN_PREFIX):], "column": column_name(ep, target),
                        "endpoint": ep, "description": ENDPOINTS[ep]["description"],
                        "target_sensitivity": float(target), "threshold": t,
                        "oof_sensitivity": sens, "oof_specificity": spec,
                        "oof_n_positive": int(y_bin.sum()), "oof_n_negative": int(y_bin.size - y_bin.sum())})
    return out


def apply_operating_points(points: Sequence[dict[str, Any]], probs: np.ndarray) -> dict[str, np.ndarray]:
    """``{column: flagged bool [n]}`` for calibrated probabilities ``[n, C]`` (no threshold -> never flagged)."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1, np.asarray(probs).shape[-1])
    out = {}
    for op in points:
        score = endpoint_score_all(op["endpoint"], p)
        t = op.get("threshold")
        out[op["column"]] = np.zeros(len(p), bool) if t is None else score >= float(t)
    return out


def save_operating_points(run_url: str, points: list[dict[str, Any]]) -> str:
    url = storage.join(run_url, OPERATING_POINTS_FILE)
    storage.write_text_atomic(url, json.dumps({"operating_points": points}, indent=2, sort_keys=True) + "\n")
    return url


def load_operating_points(run_url: str) -> list[dict[str, Any]]:
    """The run's operating points ([] for a run trained before they existed)."""
    url = storage.join(run_url, OPERATING_POINTS_FILE)
    if not storage.exists(url):
        return []
    try:
        points = json.loads(storage.read_text(url))["operating_points"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{url}: invalid operating points file: {exc}") from None
    for op in points:
        if parse_column(str(op.get("column"))) is None:
            raise ConfigError(f"{url}: bad operating point column {op.get('column')!r}")
    return points
