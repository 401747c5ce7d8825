"""Patient-level bootstrap confidence intervals for the metrics in :mod:`her2ray.reports.metrics`.

Why patient level: slides of one patient are correlated (same tumour, same staining run). Resampling slides
independently would pretend they are independent evidence and give intervals that are too narrow. Each
replicate therefore draws *patients* with replacement and keeps all slides of each drawn patient.

Why separate fast metric functions: 1000 replicates x several metrics through scikit-learn take seconds per
cohort (and per center). A replicate is represented by integer row weights (how often each slide was drawn)
and the functions here compute the same numbers from pre-ranked scores and weighted confusion matrices;
the point estimate returned with each interval is computed by the same function on the full data, and the
tests check it equals :func:`classification_metrics` (i.e. scikit-learn).

Interval: percentile bootstrap (``alpha/2`` and ``1 - alpha/2`` quantiles of the replicate values).
Replicates where a metric is undefined (e.g. a class drawn zero times) are skipped and counted.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..labels import HER2_SCORES, NUM_CLASSES
from .metrics import ENDPOINTS, endpoint_scores, validate_inputs

DEFAULT_METRIC_KEYS: tuple[str, ...] = (
    "accuracy", "auc_macro_ovr", "f1_micro", "f1_macro", "qwk",
    *(f"auc_per_class.{c}" for c in HER2_SCORES),
    *(f"endpoints.{e}.auc" for e in ENDPOINTS),
)


class _WeightedAUC:
    """ROC AUC of a fixed (truth, score) pair under integer row weights (bootstrap multiplicities).

    Mann-Whitney form with ties counted 1/2, which equals scikit-learn's trapezoidal AUC; the scores are
    ranked once, so each replicate costs two ``bincount`` calls instead of a sort.
    """

    def __init__(self, y_bin: np.ndarray, score: np.ndarray, rows: np.ndarray | None = None):
        self.rows = rows  # subset of rows the endpoint uses (None: all)
        self.pos = np.asarray(y_bin).astype(bool)
        _, self.level = np.unique(np.asarray(score, dtype=np.float64), return_inverse=True)
        self.n_levels = int(self.level.max()) + 1 if self.level.size else 0

    def __call__(self, weights: np.ndarray) -> float | None:
        w = weights if self.rows is None else weights[self.rows]
        w = w.astype(np.float64)
        w_pos = w * self.pos
        w_neg = w - w_pos
        n_pos, n_neg = w_pos.sum(), w_neg.sum()
        if n_pos == 0 or n_neg == 0:
            return None
        pos_at = np.bincount(self.level, weights=w_pos, minlength=self.n_levels)
        neg_at = np.bincount(self.level, weights=w_neg, minlength=self.n_levels)
        neg_below = np.cumsum(neg_at) - neg_at
        return float((pos_at * (neg_below + 0.5 * neg_at)).sum() / (n_pos * n_neg))


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


class _Prepared:
    """Per-dataset precomputation shared by all replicates: predictions, cell ids, ranked scores."""

    def __init__(self, y: np.ndarray, probs: np.ndarray):
        self.y, self.probs = y, probs
        self.c = probs.shape[1]
        self.pred = np.argmax(probs, axis=1)
        self.correct = (self.pred == y).astype(np.float64)
        self.cell = y * self.c + self.pred
        self.present = [k for k in range(self.c) if np.any(y == k)]
        self._auc: dict[str, _WeightedAUC] = {}

    def class_auc(self, k: int) -> _WeightedAUC:
        key = f"class{k}"
        if key not in self._auc:
            self._auc[key] = _WeightedAUC(self.y == k, self.probs[:, k])
        return self._auc[key]

    def endpoint_auc(self, name: str) -> _WeightedAUC:
        if name not in self._auc:
            rows = np.flatnonzero(np.isin(self.y, ENDPOINTS[name]["population"]))
            y_bin, score = endpoint_scores(name, self.y, self.probs)
            self._auc[name] = _WeightedAUC(y_bin, score, rows)
        return self._auc[name]

    def confusion(self, w: np.ndarray) -> np.ndarray:
        return np.bincount(self.cell, weights=w, minlength=self.c * self.c).reshape(self.c, self.c)


def _metric_function(key: str, prep: _Prepared) -> Callable[[np.ndarray], float | None]:
    """Function of the row weights for a dotted metric key."""
    if key in ("accuracy", "f1_micro"):
        return lambda w: float((w * prep.correct).sum() / w.sum())
    if key == "f1_macro":
        return lambda w: _f1_macro(prep.confusion(w))
    if key == "qwk":
        return lambda w: _qwk(prep.confusion(w))
    if key == "auc_macro_ovr":
        # Same class set as the point estimate: a replicate missing one of them is undefined.
        fns = [prep.class_auc(k) for k in prep.present]

        def macro(w: np.ndarray) -> float | None:
            if len(fns) < 2:
                return None
            aucs = [f(w) for f in fns]
            return None if any(a is None for a in aucs) else float(np.mean(aucs))
        return macro
    if key.startswith("auc_per_class."):
        name = key.split(".", 1)[1]
        if name not in HER2_SCORES:
            raise ValueError(f"unknown class in metric key {key!r}; classes are {list(HER2_SCORES)}")
        return prep.class_auc(HER2_SCORES.index(name))
    if key.startswith("endpoints.") and key.endswith(".auc"):
        ep = key[len("endpoints."):-len(".auc")]
        if ep not in ENDPOINTS:
            raise ValueError(f"unknown endpoint in metric key {key!r}; endpoints are {list(ENDPOINTS)}")
        return prep.endpoint_auc(ep)
    raise ValueError(f"unsupported bootstrap metric key {key!r}; use one of {list(DEFAULT_METRIC_KEYS)}")


def bootstrap_weights(groups: Sequence[Any], n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` integer weight vectors: how often each row is in a replicate that draws groups
    (patients) with replacement. All rows of one group always get the same weight, so the slides of one
    patient travel together. Deterministic given ``seed`` and the order of ``groups``.
    """
    groups = np.asarray([str(g) for g in groups], dtype=object)
    if groups.size == 0:
        return
    _, group_of_row = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_row.max()) + 1
    rng = np.random.default_rng(seed)
    for _ in range(int(n_boot)):
        drawn = np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)
        yield drawn[group_of_row]


def bootstrap_indices(groups: Sequence[Any], n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The replicates of :func:`bootstrap_weights` as row-index arrays (each row repeated by its weight)."""
    rows = np.arange(len(groups))
    for w in bootstrap_weights(groups, n_boot, seed):
        yield np.repeat(rows, w)


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
    prep = _Prepared(y, p)
    fns = {k: _metric_function(k, prep) for k in keys}
    ones = np.ones(y.size, dtype=np.int64)
    estimates = {k: fn(ones) for k, fn in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for w in bootstrap_weights(groups, n_boot, seed):
        for k, fn in fns.items():
            value = fn(w)
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


def paired_bootstrap_diff(y_true: Any, probs_a: Any, probs_b: Any, groups: Sequence[Any] | None = None,
                          metric_key: str = "auc_macro_ovr", n_boot: int = 1000, seed: int = 0,
                          alpha: float = 0.05) -> dict[str, Any]:
    """Paired bootstrap of ``metric(a) - metric(b)`` on the same slides (same truth, two models' probabilities).

    Each replicate draws patients (``groups``) with replacement and evaluates both models on the *same* draw,
    so the per-slide pairing is kept. Returns ``{"diff", "lo", "hi", "p_value", "n_valid", "n_boot"}``; the
    two-sided p-value is ``2 * min(P(diff* <= 0), P(diff* >= 0))`` over replicates (capped at 1).
    """
    y, pa = validate_inputs(y_true, probs_a, NUM_CLASSES)
    _, pb = validate_inputs(y_true, probs_b, NUM_CLASSES)
    groups = np.arange(y.size) if groups is None else groups
    fa, fb = _metric_function(metric_key, _Prepared(y, pa)), _metric_function(metric_key, _Prepared(y, pb))
    ones = np.ones(y.size, dtype=np.int64)
    a0, b0 = fa(ones), fb(ones)
    diffs = []
    for w in bootstrap_weights(groups, n_boot, seed):
        a, b = fa(w), fb(w)
        if a is not None and b is not None:
            diffs.append(a - b)
    d = np.asarray(diffs, dtype=np.float64)
    ok = d.size >= 2
    return {"diff": None if a0 is None or b0 is None else float(a0 - b0), "a": a0, "b": b0,
            "lo": float(np.quantile(d, alpha / 2)) if ok else None,
            "hi": float(np.quantile(d, 1 - alpha / 2)) if ok else None,
            "p_value": float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))) if ok else None,
            "n_valid": int(d.size), "n_boot": int(n_boot), "metric": metric_key}
