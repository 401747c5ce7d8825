"""Cross-validation splits: patient grouping, stratification, reproducibility, leave-one-center-out."""

from __future__ import annotations

from collections import Counter

import pytest

from her2ray.errors import ConfigError
from her2ray.training.config import TrainConfig
from her2ray.training.run import make_or_check_splits, select_sets
from her2ray.training.splits import (TEST_FOLD, assign_folds, fold_centers, fold_label_counts, read_splits,
                                     write_splits)


def cohort(n_patients=40, slides_per_patient=(1, 2, 3), n_centers=3):
    rows = []
    for p in range(n_patients):
        for s in range(slides_per_patient[p % len(slides_per_patient)]):
            rows.append({"slide_id": f"P{p:03d}-S{s}", "patient_id": f"P{p:03d}", "label": (p * 7) % 4,
                         "center": f"C{p % n_centers}"})
    return rows


def test_patient_grouped_and_stratified():
    rows = assign_folds(cohort(), folds=5, seed=0)
    fold_of_patient: dict[str, set[int]] = {}
    for r in rows:
        fold_of_patient.setdefault(r["patient_id"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in fold_of_patient.values()), "a patient straddles folds"
    assert sorted({r["fold"] for r in rows}) == [0, 1, 2, 3, 4]
    counts = fold_label_counts(rows)
    overall = Counter(r["label"] for r in rows)
    for k, per in counts.items():
        assert set(per) == {"0", "1+", "2+", "3+"}, f"fold {k} lacks a class: {per}"
        n = sum(per.values())
        assert abs(n - len(rows) / 5) <= 4
    # each class spread roughly evenly: no fold holds more than 35% of a class
    for label, total in overall.items():
        per_fold = Counter(r["fold"] for r in rows if r["label"] == label)
        assert max(per_fold.values()) <= 0.35 * total + 1


def test_splits_reproducible_from_seed_and_independent_of_row_order():
    rows = cohort()
    a = {r["slide_id"]: r["fold"] for r in assign_folds(rows, 5, seed=3)}
    b = {r["slide_id"]: r["fold"] for r in assign_folds(list(reversed(rows)), 5, seed=3)}
    c = {r["slide_id"]: r["fold"] for r in assign_folds(rows, 5, seed=4)}
    assert a == b
    assert a != c


def test_leave_one_center_out_never_mixes_centers():
    rows = assign_folds(cohort(n_centers=4), folds=5, seed=0, split_by="center")
    centers = fold_centers(rows)
    assert len(centers) == 4                       # folds = number of centers, --folds ignored
    assert all(len(c) == 1 for c in centers.values())
    assert sorted(c[0] for c in centers.values()) == ["C0", "C1", "C2", "C3"]


def test_center_split_needs_centers():
    rows = cohort(n_centers=1)
    with pytest.raises(ConfigError, match="at least 2 centers"):
        assign_folds(rows, split_by="center")
    rows[0]["center"] = None
    with pytest.raises(ConfigError, match="needs a center"):
        assign_folds(cohort(n_centers=2)[:1] + [dict(rows[0])], split_by="center")


def test_too_few_patients_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 5 patients"):
        assign_folds(cohort(n_patients=4), folds=5)


def test_external_centers_and_splits_file(tmp_path):
    rows = cohort(n_centers=3)
    cfg = TrainConfig(train_centers=["C0", "C1"], test_centers=["C2"], folds=3)
    cv, test, excluded = select_sets(rows, [], cfg, "m.csv")
    assert {r["center"] for r in cv} == {"C0", "C1"} and {r["center"] for r in test} == {"C2"}
    assert not excluded
    split_rows = make_or_check_splits(str(tmp_path), cv, test, cfg)
    assert {r["fold"] for r in split_rows if r["center"] == "C2"} == {TEST_FOLD}
    stored = read_splits(str(tmp_path / "splits.parquet"))
    assert {(r["slide_id"], r["fold"]) for r in stored} == {(r["slide_id"], r["fold"]) for r in split_rows}
    assert {"slide_id", "patient_id", "her2_score", "fold", "center", "set"} <= set(stored[0])
    # same inputs -> accepted (resume); other seed -> refused
    make_or_check_splits(str(tmp_path), cv, test, cfg)
    with pytest.raises(ConfigError, match="different splits"):
        make_or_check_splits(str(tmp_path), cv, test, cfg.model_copy(update={"seed": 9}))


def test_centers_outside_train_and_test_are_excluded_with_reason():
    rows = cohort(n_centers=3)
    cfg = TrainConfig(train_centers=["C0"], test_centers=["C1"])
    _, _, excluded = select_sets(rows, [], cfg, "m.csv")
    assert excluded and all("C2" in e["reason"] for e in excluded)
    with pytest.raises(ConfigError, match="not in the manifest"):
        select_sets(rows, [], TrainConfig(train_centers=["C0"], test_centers=["X"]), "m.csv")


def test_write_read_roundtrip(tmp_path):
    rows = assign_folds(cohort(), 5, 0)
    write_splits(rows, str(tmp_path / "s.parquet"))
    back = read_splits(str(tmp_path / "s.parquet"))
    assert [(r["slide_id"], r["fold"], r["label"]) for r in back] == [(r["slide_id"], r["fold"], r["label"])
                                                                        for r in rows]
