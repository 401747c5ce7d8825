"""Cross-validation splits: patient-grouped + HER2-stratified k-fold, leave-one-center-out, external test.

Why grouped: slides of one patient are near-duplicates for a MIL model; letting them straddle train and
validation inflates every metric. Why stratified: HER2 3+ and 0 are minorities in most cohorts, and a
fold without a class makes its macro AUC undefined. Leave-one-center-out measures the scanner/stain
shift that a random split hides. Splits depend only on the slide set and the seed (rows are sorted by
slide id first), so the same command always produces the same folds, and they are written to
``RUN/splits.parquet`` so every later stage reads them instead of recomputing.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from .. import storage
from ..errors import ConfigError
from ..labels import score_name

SPLITS_FILE = "splits.parquet"
TEST_FOLD = -1  # fold value of slides in the external/held-out test set


def stratified_group_folds(labels: Sequence[int], groups: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """Fold index per item: StratifiedGroupKFold(shuffle=True, random_state=seed) over the given order."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray([str(g) for g in groups])
    n_groups = len(set(groups.tolist()))
    if n_groups < folds:
        raise ConfigError(f"{folds} folds need at least {folds} patients, found {n_groups}")
    out = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "least populated class has only N members": expected for rare scores; folds stay group-pure.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            out[val_idx] = k
    return out


def assign_folds(rows: Iterable[dict[str, Any]], folds: int = 5, seed: int = 0,
                 split_by: str = "patient") -> list[dict[str, Any]]:
    """Copy of ``rows`` (each with slide_id, label, patient_id [, center]) with a ``fold`` key added.

    ``split_by="patient"``: stratified by label, grouped by patient. ``split_by="center"``: one fold per
    center (sorted by name), each fold holds out one whole center; ``folds`` is then ignored.
    """
    rows = sorted((dict(r) for r in rows), key=lambda r: r["slide_id"])
    if not rows:
        raise ConfigError("no slides to split")
    if split_by == "center":
        missing = [r["slide_id"] for r in rows if not r.get("center")]
        if missing:
            raise ConfigError(f"split_by=center needs a center for every slide; missing for {missing[:5]}")
        centers = sorted({str(r["center"]) for r in rows})
        if len(centers) < 2:
            raise ConfigError(f"leave-one-center-out needs at least 2 centers, found {centers}")
        index = {c: i for i, c in enumerate(centers)}
        for r in rows:
            r["fold"] = index[str(r["center"])]
        return rows
    if split_by != "patient":
        raise ConfigError(f"unknown split_by {split_by!r} (patient or center)")
    fold_of = stratified_group_folds([r["label"] for r in rows],
                                     [r.get("patient_id") or r["slide_id"] for r in rows], folds, seed)
    for r, k in zip(rows, fold_of):
        r["fold"] = int(k)
    return rows


def fold_centers(rows: Iterable[dict[str, Any]]) -> dict[int, list[str]]:
    """Centers present in each fold (for reports and the leave-one-center-out check)."""
    out: dict[int, set[str]] = {}
    for r in rows:
        out.setdefault(int(r["fold"]), set()).add(str(r.get("center") or ""))
    return {k: sorted(v) for k, v in sorted(out.items())}


def fold_label_counts(rows: Iterable[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """Slides per HER2 score per fold."""
    out: dict[int, Counter] = {}
    for r in rows:
        out.setdefault(int(r["fold"]), Counter())[score_name(r["label"])] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def splits_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Arrow table of the splits: slide_id, patient_id, center, her2_score ("0".."3+"), label, fold, set."""
    return pa.table({
        "slide_id": pa.array([r["slide_id"] for r in rows], pa.string()),
        "patient_id": pa.array([str(r.get("patient_id") or r["slide_id"]) for r in rows], pa.string()),
        "center": pa.array([(str(r["center"]) if r.get("center") else None) for r in rows], pa.string()),
        "her2_score": pa.array([score_name(r["label"]) for r in rows], pa.string()),
        "label": pa.array([int(r["label"]) for r in rows], pa.int64()),
        "fold": pa.array([int(r["fold"]) for r in rows], pa.int64()),
        "set": pa.array(["test" if int(r["fold"]) == TEST_FOLD else "cv" for r in rows], pa.string()),
    })


def write_splits(rows: Sequence[dict[str, Any]], url: str) -> None:
    storage.write_parquet_atomic(splits_table(rows), url)


def read_splits(url: str) -> list[dict[str, Any]]:
    return storage.read_parquet(url).to_pylist()
