"""Can this cohort be split into ``--folds`` patient-grouped, HER2-stratified folds? Checked before Ray starts.

Why per class and per patient: folds are grouped by patient and stratified by HER2 score, so each score
needs at least one patient per fold. With fewer, some validation fold has no slide of that score (its
macro AUC is undefined) and, when every score is short, scikit-learn stops with a bare
``n_splits=5 cannot be greater than the number of members in each class``. This check says which score is
short, by how much, and what to do, in words a lab can act on.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import ConfigError
from ..labels import HER2_SCORES, score_name


def patients_per_score(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Distinct patients per HER2 score ("0", "1+", "2+", "3+"), scores absent from the cohort omitted."""
    patients: dict[str, set[str]] = {}
    for r in rows:
        patients.setdefault(score_name(int(r["label"])), set()).add(str(r.get("patient_id") or r["slide_id"]))
    return {s: len(patients[s]) for s in HER2_SCORES if s in patients}


def check_fold_counts(rows: list[dict[str, Any]], folds: int, split_by: str = "patient") -> None:
    """``ConfigError`` naming the class counts when a HER2 score has fewer patients than ``folds``."""
    if split_by != "patient" or not rows:
        return
    counts = patients_per_score(rows)
    short = {s: n for s, n in counts.items() if n < folds}
    if not short:
        return
    table = ", ".join(f"{s}: {n}" for s, n in counts.items())
    fewest = min(counts.values())
    advice = [f"use --folds {fewest}" if fewest >= 2 else "add patients of the rare score(s)",
              "merge rare scores into a neighbouring class in the manifest (e.g. 2+ with 3+)",
              "or --split-by center (leave-one-center-out) when the manifest has centers"]
    raise ConfigError(
        f"--folds {folds} needs at least {folds} patients of every HER2 score (each validation fold must hold "
        f"every score), but the cohort has patients per score {{{table}}}; too few for "
        f"{', '.join(sorted(short))}. Fix: " + "; ".join(advice) + ".")
