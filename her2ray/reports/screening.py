"""Screening flags: names of the flag columns, sensitivity/specificity, patient-level bootstrap CIs.

A screening operating point (``her2ray.training.operating_points``) is a threshold on an endpoint score of
:data:`her2ray.reports.metrics.ENDPOINTS`; ``score`` writes one boolean column per point, named
``screen_<endpoint>_sens<percent>`` (e.g. ``screen_her2_0_vs_low_sens95``: flag = the slide may be HER2-low,
chosen to miss at most 5 % of HER2-low slides out of fold). ``evaluate`` reads those columns back (CSV or
Parquet, no model needed), restricts each to its endpoint's population (e.g. truth in {0, 1+, 2+}) and
reports the achieved sensitivity TP/(TP+FN) and specificity TN/(TN+FP) with percentile bootstrap CIs that
resample patients (:func:`her2ray.reports.bootstrap.bootstrap_weights`), next to the target.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from .bootstrap import bootstrap_weights
from .metrics import ENDPOINTS, endpoint_scores

COLUMN_PREFIX = "screen_"
_COLUMN = re.compile(r"^screen_(?P<endpoint>[a-z0-9_]+?)_sens(?P<pct>\d+(?:_\d+)?)$")


def column_name(endpoint: str, target: float) -> str:
    """``screen_her2_0_vs_low_sens90`` for target 0.9; 0.975 gives ``..._sens97_5``."""
    pct = f"{round(float(target) * 100, 6):g}".replace(".", "_")
    return f"{COLUMN_PREFIX}{endpoint}_sens{pct}"


def parse_column(name: str) -> tuple[str, float] | None:
    """``(endpoint, target sensitivity)`` of a flag column name; None for any other column."""
    m = _COLUMN.match(str(name))
    if not m or m.group("endpoint") not in ENDPOINTS:
        return None
    return m.group("endpoint"), float(m.group("pct").replace("_", ".")) / 100.0


def endpoint_score_all(endpoint: str, probs: np.ndarray) -> np.ndarray:
    """The endpoint score of every slide, whatever its truth (a flag is defined on any slide)."""
    p = np.asarray(probs, dtype=np.float64)
    population_class = ENDPOINTS[endpoint]["population"][0]
    return endpoint_scores(endpoint, np.full(len(p), population_class, dtype=np.int64), p)[1]


def sens_spec(y_bin: Any, flagged: Any, weights: np.ndarray | None = None) -> tuple[float | None, float | None]:
    """Sensitivity TP/(TP+FN) and specificity TN/(TN+FP), optionally under row weights (bootstrap)."""
    pos = np.asarray(y_bin).astype(bool)
    flag = np.asarray(flagged).astype(bool)
    w = np.ones(len(pos)) if weights is None else np.asarray(weights, dtype=np.float64)
    n_pos, n_neg = float((w * pos).sum()), float((w * ~pos).sum())
    sens = float((w * (pos & flag)).sum() / n_pos) if n_pos else None
    spec = float((w * (~pos & ~flag)).sum() / n_neg) if n_neg else None
    return sens, spec


def _ci(values: list[float], estimate: float | None, alpha: float) -> dict[str, Any]:
    vals = np.asarray(values, dtype=np.float64)
    ok = vals.size >= 2 and estimate is not None
    return {"estimate": estimate, "lo": float(np.quantile(vals, alpha / 2)) if ok else None,
            "hi": float(np.quantile(vals, 1 - alpha / 2)) if ok else None, "n_valid": int(vals.size)}


def screening_summary(y_true: Any, flags: Mapping[str, Any], groups: Sequence[Any], *, n_boot: int = 1000,
                      seed: int = 0, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Per flag column: endpoint, target, counts, sensitivity and specificity with patient-bootstrap CIs.

    ``flags``: {column name: bool per slide}; columns whose name is not a screening flag are ignored.
    """
    y = np.asarray(y_true, dtype=np.int64)
    groups = [str(g) for g in groups]
    out = []
    for column in sorted(flags):
        parsed = parse_column(column)
        if parsed is None:
            continue
        endpoint, target = parsed
        spec = ENDPOINTS[endpoint]
        keep = np.isin(y, spec["population"])
        y_bin = np.isin(y[keep], spec["positive"])
        flag = np.asarray(flags[column]).astype(bool)[keep]
        sens, specificity = sens_spec(y_bin, flag)
        boot_sens, boot_spec = [], []
        for w in bootstrap_weights([g for g, k in zip(groups, keep) if k], n_boot, seed):
            s, p = sens_spec(y_bin, flag, w)
            if s is not None:
                boot_sens.append(s)
            if p is not None:
                boot_spec.append(p)
        out.append({"column": column, "endpoint": endpoint, "description": spec["description"],
                    "target_sensitivity": target, "n": int(keep.sum()), "n_positive": int(y_bin.sum()),
                    "n_negative": int(y_bin.size - y_bin.sum()), "n_flagged": int(flag.sum()),
                    "sensitivity": _ci(boot_sens, sens, alpha), "specificity": _ci(boot_spec, specificity, alpha),
                    "n_boot": int(n_boot), "seed": int(seed)})
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _with_ci(stat: Mapping[str, Any] | None) -> str:
    if not stat or stat.get("estimate") is None:
        return "n/a"
    text = _pct(stat["estimate"])
    if stat.get("lo") is not None:
        text += f" ({_pct(stat['lo'])}-{_pct(stat['hi'])})"
    return text


def screening_markdown(rows: Sequence[Mapping[str, Any]], heading: str = "##") -> str:
    """Markdown table of operating points: target, OOF threshold/sens/spec (when known), achieved sens/spec
    with 95 % patient-bootstrap CIs. ``rows``: :func:`screening_summary` entries, or training's operating points
    with the summary under ``"test"``."""
    if not rows:
        return ""
    lines = [f"{heading} Screening operating points", "",
             "A slide is flagged when its endpoint score is >= the threshold picked on the out-of-fold predictions "
             "to reach the target sensitivity; achieved values with 95 % patient-level bootstrap CIs.", "",
             "| Flag column | Target sens. | Threshold | OOF sens. | OOF spec. | Sensitivity (95 % CI) | "
             "Specificity (95 % CI) | Pos / neg |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        achieved = r.get("test") if "test" in r else r
        thr = r.get("threshold")
        lines.append(
            f"| `{r['column']}` | {_pct(r['target_sensitivity'])} | {'n/a' if thr is None else f'{thr:.4f}'} | "
            f"{_pct(r.get('oof_sensitivity'))} | {_pct(r.get('oof_specificity'))} | "
            f"{_with_ci((achieved or {}).get('sensitivity'))} | {_with_ci((achieved or {}).get('specificity'))} | "
            f"{(achieved or {}).get('n_positive', 'n/a')} / {(achieved or {}).get('n_negative', 'n/a')} |")
    return "\n".join(lines) + "\n"


def calibration_change_markdown(before: Mapping[str, Any], after: Mapping[str, Any], method: str = "",
                                heading: str = "##") -> str:
    """Two-row table: ECE and Brier before and after calibration."""
    fmt = "{:.3f}".format
    return "\n".join([f"{heading} Calibration" + (f" ({method})" if method else ""), "",
                      "| | ECE (top-label) | Brier |", "|---|---|---|",
                      f"| uncalibrated (`prob_uncal_her2_*`) | {fmt(before['ece'])} | {fmt(before['brier'])} |",
                      f"| calibrated (`prob_her2_*`) | {fmt(after['ece'])} | {fmt(after['brier'])} |", ""])
