"""Patient-level bootstrap confidence intervals for the metrics in :mod:`her2ray.reports.metrics`.

Why patient level: slides of one patient are correlated (same tumour, same staining run). Resampling slides
independently would pretend they are independent evidence and give intervals that are too narrow. Each
replicate therefore draws *patients* with replacement and keeps all slides of each drawn patient.

Why separate fast metric functions: 1000 replicates x several metrics through scikit-learn take seconds per
cohort (and per center). The functions here compute the same numbers from ranks and confusion matrices;
the point estimate returned with each interval is computed by the same function on the full data, and the
tests check it equals :func:`classification_metrics` (i.e. scikit-learn).

Interval: percentile bootstrap (``alpha/2`` and ``1 - alpha/2`` quantiles of the replicate values).
Replicates where a metric is undefined (e.g. a class drawn zero times) are skipped and counted.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from scipy.stats import rankdata

from ..labels import HER2_SCORES, NUM_CLASSES
from .metrics import ENDPOINTS, endpoint_scores, validate_inputs

DEFAULT_METRIC_KEYS: tuple[str, ...] = (
    "accuracy", "auc_macro_ovr", "f1_macro", "qwk",
    *(f"auc_per_class.{c}" for c in HER2_SCORES),
    *(f"endpoints.{e}.auc" for e in ENDPOINTS),
)


def _auc(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    """Mann-Whitney form of the ROC AUC (ties count 1/2): equal to sklearn's trapezoidal AUC."""
    n_pos = int(y_bin.sum())
    n_neg = y_bin.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[y_bin.astype(bool)].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _confusion(y: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
    return np.bincount(y * c + pred, minlength=c * c).reshape(c, c)


def _qwk(cm: np.ndarray) -> float | None:
    c = cm.shape[0]
    idx = np.arange(c)
    w = (idx[:, None] - idx[None, :]) ** 2
    n = cm.sum()
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    den = float((w * expected).sum())
    if den == 0:
        return None
    return float(1.0 - (w * cm).sum() / den)


def _f1_macro(cm: np.ndarray) -> float:
    """Macro F1 over labels present in truth or prediction (scikit-learn's default label set)."""
    tp = np.diag(cm).astype(float)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    used = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    f1 = 2 * tp[used] / (2 * tp[used] + fp[used] + fn[used])
    return float(f1.mean())


class _Context:
    """Things several metrics of one replicate share (prediction, confusion matrix), computed once."""

    def __init__(self, y: np.ndarray, probs: np.ndarray):
        self.y, self.probs = y, probs
        self.pred = np.argmax(probs, axis=1)
        self._cm: np.ndarray | None = None

    @property
    def cm(self) -> np.ndarray:
        if self._cm is None:
            self._cm = _confusion(self.y, self.pred, self.probs.shape[1])
        return self._cm


def _metric_function(key: str, reference_classes: Sequence[int]) -> Callable[[_Context], float | None]:
    """Fast function for a dotted metric key; ``reference_classes``: the classes present in the full data."""
    if key in ("accuracy", "f1_micro"):
        return lambda c: float(np.mean(c.pred == c.y))
    if key == "f1_macro":
        return lambda c: _f1_macro(c.cm)
    if key == "qwk":
        return lambda c: _qwk(c.cm)
    if key == "auc_macro_ovr":
        def macro(c: _Context) -> float | None:
            # Same class set as the point estimate: a replicate missing one of them is undefined.
            if len(reference_classes) < 2:
                return None
            aucs = [_auc((c.y == k).astype(np.int64), c.probs[:, k]) for k in reference_classes]
            return None if any(a is None for a in aucs) else float(np.mean(aucs))
        return macro
    if key.startswith("auc_per_class."):
        name = key.split(".", 1)[1]
        if name not in HER2_SCORES:
            raise ValueError(f"unknown class in metric key {key!r}; classes are {list(HER2_SCORES)}")
        k = HER2_SCORES.index(name)
        return lambda c: _auc((c.y == k).astype(np.int64), c.probs[:, k])
    if key.startswith("endpoints.") and key.endswith(".auc"):
        ep = key[len("endpoints."):-len(".auc")]
        if ep not in ENDPOINTS:
            raise ValueError(f"unknown endpoint in metric key {key!r}; endpoints are {list(ENDPOINTS)}")
        return lambda c: _auc(*endpoint_scores(ep, c.y, c.probs))
    raise ValueError(f"unsupported bootstrap metric key {key!r}; use one of {list(DEFAULT_METRIC_KEYS)} "
                     "or f1_micro")


def bootstrap_indices(groups: Sequence[Any], n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` arrays of row indices, each drawing the groups (patients) with replacement.

    Every row of a drawn group appears as many times as its group was drawn, so the slides of one patient
    always travel together. Deterministic given ``seed`` and the order of ``groups``.
    """
    groups = np.asarray(groups, dtype=object)
    _, group_of_row = np.unique(groups.astype(str), return_inverse=True)
    n_groups = int(group_of_row.max()) + 1 if groups.size else 0
    rng = np.random.default_rng(seed)
    rows = np.arange(groups.size)
    for _ in range(int(n_boot)):
        drawn = np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)
        yield np.repeat(rows, drawn[group_of_row])


def bootstrap_ci(y_true: Any, probs: Any, groups: Sequence[Any] | None = None,
                 metric_keys: Iterable[str] = DEFAULT_METRIC_KEYS, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """Percentile bootstrap CIs, resampling ``groups`` (patient ids; default: each slide its own patient).

    Returns ``{key: {"estimate", "lo", "hi", "n_valid", "n_boot"}}``; ``lo``/``hi`` are ``None`` when fewer
    than 2 replicates define the metric, ``estimate`` is ``None`` when the full data do not define it.
    Metric keys are dotted paths into :func:`classification_metrics`'s dict, e.g. ``"accuracy"``,
    ``"auc_per_class.3+"``, ``"endpoints.her2_0_vs_low.auc"``.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    y, p = validate_inputs(y_true, probs, NUM_CLASSES)
    if groups is None:
        groups = np.arange(y.size)
    if len(groups) != y.size:
        raise ValueError(f"groups has {len(groups)} entries for {y.size} samples")
    keys = list(dict.fromkeys(metric_keys))
    present = [k for k in range(NUM_CLASSES) if np.any(y == k)]
    fns = {k: _metric_function(k, present) for k in keys}
    full = _Context(y, p)
    estimates = {k: fn(full) for k, fn in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for idx in bootstrap_indices(groups, n_boot, seed):
        ctx = _Context(y[idx], p[idx])
        for k, fn in fns.items():
            value = fn(ctx)
            if value is not None:
                samples[k].append(value)
    out: dict[str, dict[str, Any]] = {}
    for k in keys:
        vals = np.asarray(samples[k], dtype=np.float64)
        ok = vals.size >= 2 and estimates[k] is not None
        out[k] = {
            "estimate": estimates[k],
            "lo": float(np.quantile(vals, alpha / 2)) if ok else None,
            "hi": float(np.quantile(vals, 1 - alpha / 2)) if ok else None,
            "n_valid": int(vals.size),
            "n_boot": int(n_boot),
        }
    return out
