"""Classification metrics for HER2 IHC scoring (0, 1+, 2+, 3+), with stable keys.

Every number here is the scikit-learn number on the same inputs, so that results from training, evaluation
and multi-center work are comparable with each other and with published work. The functions never crash
because a class is missing from a fold: the affected entry becomes ``None`` and ``notes`` says why.

Prediction rule: ``pred = argmax(probs)`` (ties go to the lower score, as ``numpy.argmax``).

Clinical endpoints are derived from the same 4-class probabilities (no second model):

``her2_0_vs_low``
    slides whose truth is 0, 1+ or 2+; positive = HER2-low (1+/2+);
    score = (p1+ + p2+) / (p0 + p1+ + p2+), i.e. *renormalised* to the three classes of the question.
``her2_low_vs_positive``
    slides whose truth is 1+, 2+ or 3+; positive = 3+; score = p3+ / (p1+ + p2+ + p3+) (renormalised).
``her2_3plus_vs_rest``
    all slides; positive = 3+; score = p3+.

Why renormalise: each endpoint is asked on a restricted population (e.g. "is this HER2-0 or HER2-low?" is
asked only once 3+ is excluded). Mass the model puts on the excluded class says nothing about that question,
and without renormalising a fixed threshold (0.5) would mean different things on slides with more or less
3+ mass. When the renormalising sum is 0 the score is 0.5 (no information either way).

Operating points: at each threshold t the endpoint predicts positive when ``score >= t``;
FPR = FP / (FP + TN) and FNR = FN / (FN + TP) (``None`` when the denominator is 0).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score

from ..labels import HER2_SCORES, NUM_CLASSES

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: Scalar entries of a metrics dict (what ``summarize_folds`` averages at the top level).
SCALAR_KEYS: tuple[str, ...] = ("accuracy", "auc_macro_ovr", "f1_micro", "f1_macro", "qwk")

#: name -> (truth classes kept, positive classes, score numerator classes, score denominator classes or None)
ENDPOINTS: dict[str, dict[str, Any]] = {
    "her2_0_vs_low": {
        "population": (0, 1, 2), "positive": (1, 2), "numerator": (1, 2), "denominator": (0, 1, 2),
        "description": "HER2-0 vs HER2-low (1+/2+) on truth in {0, 1+, 2+}; "
                       "score = (p1+ + p2+) / (p0 + p1+ + p2+)",
    },
    "her2_low_vs_positive": {
        "population": (1, 2, 3), "positive": (3,), "numerator": (3,), "denominator": (1, 2, 3),
        "description": "HER2-low (1+/2+) vs HER2-positive (3+) on truth in {1+, 2+, 3+}; "
                       "score = p3+ / (p1+ + p2+ + p3+)",
    },
    "her2_3plus_vs_rest": {
        "population": (0, 1, 2, 3), "positive": (3,), "numerator": (3,), "denominator": None,
        "description": "3+ vs rest (0/1+/2+) on all slides; score = p3+",
    },
}


def validate_inputs(y_true: Any, probs: Any, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """``(y int64 [n], probs float64 [n, C])``; ``ValueError`` on shapes, labels or non-finite values.

    Rows need not sum to 1 here (the CLI checks that at its boundary); metrics only rank and argmax.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if p.ndim != 2 or p.shape != (y.shape[0], num_classes):
        raise ValueError(f"probs must have shape ({y.shape[0]}, {num_classes}), got {p.shape}")
    if y.shape[0] == 0:
        raise ValueError("no samples")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("y_true must hold integer class indices")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"y_true values must be in 0..{num_classes - 1}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or infinity")
    return y, p


def predict(probs: np.ndarray) -> np.ndarray:
    """Predicted class = argmax of the probabilities (ties -> lower class)."""
    return np.argmax(np.asarray(probs), axis=1).astype(np.int64)


def endpoint_scores(name: str, y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(binary truth, score)`` of endpoint ``name`` restricted to its population (see module docstring)."""
    spec = ENDPOINTS[name]
    keep = np.isin(y, spec["population"])
    p = probs[keep]
    num = p[:, list(spec["numerator"])].sum(axis=1)
    if spec["denominator"] is not None:
        den = p[:, list(spec["denominator"])].sum(axis=1)
        score = np.full(num.shape, 0.5)
        ok = den > 1e-12
        score[ok] = num[ok] / den[ok]
    else:
        score = num
    return np.isin(y[keep], spec["positive"]).astype(np.int64), score


def operating_points(y_bin: np.ndarray, score: np.ndarray,
                     thresholds: Iterable[float] = DEFAULT_THRESHOLDS) -> list[dict[str, Any]]:
    """FPR/FNR (and the counts behind them) when predicting positive at ``score >= threshold``."""
    y_bin = np.asarray(y_bin).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    out = []
    for t in thresholds:
        pos = score >= t
        tp = int(np.sum(pos & y_bin))
        fp = int(np.sum(pos & ~y_bin))
        fn = int(np.sum(~pos & y_bin))
        tn = int(np.sum(~pos & ~y_bin))
        out.append({
            "threshold": float(t),
            "fpr": fp / (fp + tn) if fp + tn else None,
            "fnr": fn / (fn + tp) if fn + tp else None,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        })
    return out


def _binary_auc(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    """sklearn's ROC AUC, or ``None`` when only one class is present."""
    if y_bin.size == 0 or np.all(y_bin == y_bin[0]):
        return None
    return float(roc_auc_score(y_bin, score))


def _nan_to_none(value: float) -> float | None:
    value = float(value)
    return None if not np.isfinite(value) else value


def classification_metrics(y_true: Any, probs: Any, class_names: Sequence[str] = HER2_SCORES,
                           thresholds: Iterable[float] = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """Metrics of 4-class HER2 predictions; every value equals scikit-learn's on the same numbers.

    Keys: ``n``, ``class_counts`` {name: n}, ``accuracy``, ``auc_macro_ovr`` (mean of the one-vs-rest AUCs of
    the classes that are defined; equals ``roc_auc_score(multi_class="ovr", average="macro")`` when every
    class is present), ``auc_per_class`` {name: AUC | None}, ``f1_micro`` (== accuracy), ``f1_macro``
    (``f1_score(average="macro", zero_division=0)``: macro over the labels present in truth or prediction),
    ``qwk`` (``cohen_kappa_score(weights="quadratic", labels=0..C-1)`` so the weights are true ordinal
    distances even when a class is absent), ``confusion_matrix`` (C x C list, rows = truth, columns =
    prediction), ``endpoints`` {name: {description, n, n_positive, n_negative, auc, operating_points
    [{threshold, fpr, fnr, tp, fp, tn, fn}]}}, ``notes`` [str].
    """
    names = list(class_names)
    y, p = validate_inputs(y_true, probs, len(names))
    num_classes = len(names)
    pred = predict(p)
    notes: list[str] = []
    counts = np.bincount(y, minlength=num_classes)
    present = [k for k in range(num_classes) if counts[k] > 0]
    missing = [names[k] for k in range(num_classes) if counts[k] == 0]
    if missing:
        notes.append(f"class(es) {missing} absent from the truth: their one-vs-rest AUC is undefined (None) "
                     f"and auc_macro_ovr averages the {len(present)} class(es) present")

    auc_per_class: dict[str, float | None] = {}
    for k, name in enumerate(names):
        auc_per_class[name] = _binary_auc((y == k).astype(np.int64), p[:, k])
    defined = [v for v in auc_per_class.values() if v is not None]
    if len(present) < 2:
        notes.append("fewer than two classes in the truth: no AUC is defined")
        auc_macro = None
    else:
        auc_macro = float(np.mean(defined))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qwk = _nan_to_none(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(num_classes))))
    if qwk is None:
        notes.append("quadratic weighted kappa undefined (truth and prediction each a single class)")

    endpoints: dict[str, Any] = {}
    if num_classes == NUM_CLASSES:
        for ep_name, spec in ENDPOINTS.items():
            y_bin, score = endpoint_scores(ep_name, y, p)
            auc = _binary_auc(y_bin, score)
            if auc is None:
                notes.append(f"endpoint {ep_name}: AUC undefined ({int(y_bin.sum())} positive, "
                             f"{int(y_bin.size - y_bin.sum())} negative slides)")
            endpoints[ep_name] = {
                "description": spec["description"],
                "n": int(y_bin.size),
                "n_positive": int(y_bin.sum()),
                "n_negative": int(y_bin.size - y_bin.sum()),
                "auc": auc,
                "operating_points": operating_points(y_bin, score, thresholds),
            }

    return {
        "n": int(y.size),
        "class_counts": {names[k]: int(counts[k]) for k in range(num_classes)},
        "accuracy": float(np.mean(pred == y)),
        "auc_macro_ovr": auc_macro,
        "auc_per_class": auc_per_class,
        "f1_micro": float(f1_score(y, pred, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
        "qwk": qwk,
        "confusion_matrix": confusion_matrix(y, pred, labels=list(range(num_classes))).tolist(),
        "endpoints": endpoints,
        "notes": notes,
    }


def _stats(values: Sequence[float | None], ddof: int) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    return {
        "mean": float(np.mean(vals)) if vals else None,
        "std": float(np.std(vals, ddof=ddof)) if len(vals) > ddof else None,
        "per_fold": [None if v is None else float(v) for v in values],
    }


def summarize_folds(fold_metrics: Sequence[Mapping[str, Any] | None], ddof: int = 1) -> dict[str, Any]:
    """Mean, std (``numpy.std(ddof=ddof)``; sample std by default) and per-fold values of fold metrics.

    Returns the keys of :func:`classification_metrics`: scalar keys (``accuracy``, ``auc_macro_ovr``,
    ``f1_micro``, ``f1_macro``, ``qwk``) and ``auc_per_class[name]`` and ``endpoints[name]["auc"]`` and
    each endpoint operating point's ``fpr``/``fnr`` become ``{mean, std, per_fold}``; ``None`` values
    (undefined in a fold) are left out of mean/std, kept in ``per_fold`` and explained in ``notes``.
    ``n`` is the total, ``class_counts`` and ``confusion_matrix`` are pooled (summed) over folds,
    ``n_folds`` is added and ``notes`` collects every fold's notes prefixed with its index. A fold given as
    ``None`` (no slides) counts as undefined everywhere.
    """
    raw = list(fold_metrics)
    if not raw:
        raise ValueError("no fold metrics to summarize")
    notes: list[str] = [f"fold {i}: no metrics (no slides); left out of mean/std"
                        for i, f in enumerate(raw) if not f]
    folds = [f or {} for f in raw]
    first = next((f for f in folds if f), {})

    def stat(label: str, values: list[Any]) -> dict[str, Any]:
        missing = [i for i, v in enumerate(values) if v is None and folds[i]]  # empty folds noted once
        if missing:
            defined = sum(v is not None for v in values)
            notes.append(f"{label}: undefined in fold(s) {missing}; mean/std over {defined} of {len(values)} folds")
        return _stats(values, ddof)

    out: dict[str, Any] = {"n_folds": len(folds), "n": int(sum(int(f.get("n", 0)) for f in folds))}
    for key in SCALAR_KEYS:
        out[key] = stat(key, [f.get(key) for f in folds])
    class_names = list(first.get("auc_per_class", {}).keys())
    out["auc_per_class"] = {c: stat(f"auc_per_class[{c}]", [f.get("auc_per_class", {}).get(c) for f in folds])
                            for c in class_names}
    counts = [f.get("class_counts") or {} for f in folds]
    out["class_counts"] = {c: int(sum(int(cc.get(c, 0)) for cc in counts)) for c in first.get("class_counts") or {}}
    matrices = [np.asarray(f["confusion_matrix"]) for f in folds if f.get("confusion_matrix") is not None]
    out["confusion_matrix"] = np.sum(matrices, axis=0).astype(int).tolist() if matrices else None
    endpoints: dict[str, Any] = {}
    for ep in (first.get("endpoints") or {}):
        eps = [(f.get("endpoints") or {}).get(ep) or {} for f in folds]
        ops_per_fold = [e.get("operating_points") or [] for e in eps]
        ops = []
        for j, op in enumerate(first["endpoints"][ep].get("operating_points") or []):
            t = op["threshold"]
            fold_ops = [o[j] if j < len(o) else {} for o in ops_per_fold]
            ops.append({
                "threshold": t,
                "fpr": _stats([o.get("fpr") for o in fold_ops], ddof),
                "fnr": _stats([o.get("fnr") for o in fold_ops], ddof),
            })
        endpoints[ep] = {
            "description": first["endpoints"][ep].get("description"),
            "auc": stat(f"endpoints[{ep}].auc", [e.get("auc") for e in eps]),
            "operating_points": ops,
        }
    out["endpoints"] = endpoints
    for i, f in enumerate(folds):
        notes.extend(f"fold {i}: {n}" for n in f.get("notes") or [])
    out["notes"] = notes
    return out
