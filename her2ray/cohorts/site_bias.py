"""Site-bias diagnostic: can the center be predicted from slide features?

If a linear model recovers the submitting center from mean slide embeddings, stain, scanner or
preparation differences are visible to the encoder, and a HER2 model may learn the site instead of HER2
(worst when label balance differs between centers). We report the cross-validated macro one-vs-rest AUC
of a logistic regression (0.5 = no site signal, 1.0 = centers perfectly separable) and, when labels are
known, the same after removing each HER2 class's mean feature (the part of the site signal that class
balance alone explains).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import FeatureStoreError, Her2RayError
from ..features.schema import feature_url, read_slide_features
from ..labels import parse_her2_score
from ..manifest import read_table

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.75


def _mean_features(url: str) -> tuple[np.ndarray, str] | None:
    """(mean feature, settings key as JSON) of one slide, None when it has no usable feature file."""
    try:
        sf = read_slide_features(url)
    except FeatureStoreError:
        return None
    if sf.features.shape[0] == 0:
        return None
    return sf.features.mean(axis=0), json.dumps(sf.meta.settings_key(), sort_keys=True)


def slide_mean_features(store: str, slide_ids: list[str], max_workers: int = 8
                        ) -> tuple[list[str], np.ndarray, list[str]]:
    """(ids found, mean features [n, dim], ids missing) reading feature files concurrently."""
    urls = [feature_url(store, s) for s in slide_ids]
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(urls) or 1))) as pool:
        means = list(pool.map(_mean_features, urls))
    found = [(s, m[0], m[1]) for s, m in zip(slide_ids, means) if m is not None]
    missing = [s for s, m in zip(slide_ids, means) if m is None]
    if not found:
        raise FeatureStoreError(f"{store}: none of the {len(slide_ids)} manifest slides has a feature file")
    settings = {}
    for sid, _, key in found:
        settings.setdefault(key, sid)
    if len(settings) > 1:   # e.g. one center embedded with stain normalisation: a site signal by construction
        examples = "; ".join(f"{sid}: {key}" for key, sid in list(settings.items())[:3])
        raise FeatureStoreError(f"{store}: feature files were made with {len(settings)} different settings "
                                f"(encoder/tile size/MPP/stain normalisation), not comparable: {examples}")
    return [s for s, _, _ in found], np.stack([m for _, m, _ in found]).astype(np.float64), missing


def _cv_auc(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[float, dict[str, float]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from threadpoolctl import threadpool_limits

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with threadpool_limits(limits=1):   # tiny problem: BLAS threads only add contention (10x slower on 2 cores)
        proba = cross_val_predict(model, x, y, cv=cv, method="predict_proba")
    classes = np.unique(y)
    per = {}
    for k, c in enumerate(classes):
        per[str(c)] = float(roc_auc_score(y == c, proba[:, k]))
    if len(classes) == 2:
        return float(roc_auc_score(y == classes[1], proba[:, 1])), per
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes)), per


def site_bias_auc(features_store: str, manifest: str | list[dict[str, Any]], seed: int = 0, folds: int = 5,
                  threshold: float = DEFAULT_THRESHOLD, max_workers: int = 8) -> dict[str, Any]:
    """Cross-validated macro OvR AUC of predicting ``center`` from slide-mean features.

    ``manifest``: URL of a (unified) manifest or its rows; needs ``slide_id`` and ``center``. Slides
    without a feature file are skipped (counted in ``missing_features``); centers with fewer than 2 slides
    are dropped. ``folds`` is lowered to the smallest center's size when needed. Returns a JSON-able
    report whose ``warning`` is True when ``auc > threshold``.
    """
    rows = read_table(manifest).to_pylist() if isinstance(manifest, str) else list(manifest)
    for col in ("slide_id", "center"):
        if rows and col not in rows[0]:
            raise Her2RayError(f"site-bias: manifest has no {col!r} column (merge per-center manifests with "
                               "'her2ray cohort merge' first)")
    center_of = {str(r["slide_id"]): str(r["center"]) for r in rows if r.get("center") not in (None, "")}
    labels = {}
    for r in rows:
        try:
            labels[str(r["slide_id"])] = parse_her2_score(r.get("her2_score"))
        except ValueError:
            pass
    ids, x, missing = slide_mean_features(features_store, list(center_of), max_workers)
    y = np.array([center_of[s] for s in ids])
    counts = Counter(y.tolist())
    small = sorted(c for c, n in counts.items() if n < 2)
    if small:
        keep = ~np.isin(y, small)
        ids, x, y = [s for s, k in zip(ids, keep) if k], x[keep], y[keep]
        counts = Counter(y.tolist())
    if len(counts) < 2:
        raise Her2RayError(f"site-bias needs at least 2 centers with >= 2 featurised slides each, got {dict(counts)}"
                           + (f" (dropped centers with < 2 slides: {small})" if small else ""))
    n_folds = int(min(folds, min(counts.values())))
    auc, per_center = _cv_auc(x, y, n_folds, seed)
    report: dict[str, Any] = {
        "auc": round(auc, 4), "auc_per_center": {k: round(v, 4) for k, v in per_center.items()},
        "threshold": threshold, "warning": bool(auc > threshold), "n_slides": len(ids),
        "slides_per_center": dict(sorted(counts.items())), "n_centers": len(counts), "folds": n_folds, "seed": seed,
        "feature_dim": int(x.shape[1]), "missing_features": len(missing), "missing_examples": missing[:10],
        "dropped_centers": small, "model": "StandardScaler + LogisticRegression(C=1), stratified k-fold",
    }
    lab = np.array([labels.get(s, -1) for s in ids])
    if (lab >= 0).all() and len(set(lab.tolist())) > 1:
        adj = x.copy()
        for c in np.unique(lab):
            adj[lab == c] -= adj[lab == c].mean(axis=0)
        auc_adj, _ = _cv_auc(adj, y, n_folds, seed)
        report["auc_label_adjusted"] = round(auc_adj, 4)
        report["class_counts_per_center"] = {
            c: {str(k): int(v) for k, v in sorted(Counter(lab[y == c].tolist()).items())} for c in sorted(counts)}
    if report["warning"]:
        report["message"] = (f"site is predictable from features (AUC {auc:.3f} > {threshold}): the model may learn "
                             "the center instead of HER2; consider stain normalisation, center-stratified "
                             "training and leave-one-center-out validation")
        log.warning(report["message"])
    else:
        report["message"] = f"no strong site signal (AUC {auc:.3f} <= {threshold})"
    return report
