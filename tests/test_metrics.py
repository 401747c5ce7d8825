"""Metrics equal scikit-learn's, never crash on missing classes; bootstrap, calibration, plots and report.md."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score

from her2ray.labels import HER2_SCORES
from her2ray.reports import (bootstrap_ci, bootstrap_indices, calibration_summary, classification_metrics,
                             expected_calibration_error, operating_points, reliability_bins, summarize_folds)
from her2ray.reports.bootstrap import DEFAULT_METRIC_KEYS, _metric_function, _Prepared, bootstrap_weights
from her2ray.reports.markdown import render_report, write_report
from her2ray.reports.plots import (calibration_png, confusion_png, per_center_png, roc_curves_png,
                                   training_curves_png)


def make_data(n=150, seed=0, signal=1.2, classes=(0, 1, 2, 3), round_to=None):
    rng = np.random.default_rng(seed)
    y = rng.choice(np.asarray(classes), size=n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    if round_to is not None:  # ties in the scores: rounded values, and duplicated rows with other truths
        p = np.round(p, round_to) + 1e-3
        p[: n // 3] = p[n // 3: 2 * (n // 3)]
        p /= p.sum(axis=1, keepdims=True)
    return y, p


def get(d, dotted):
    if dotted.startswith("endpoints."):
        return d["endpoints"][dotted[len("endpoints."):-len(".auc")]]["auc"]
    if dotted.startswith("auc_per_class."):
        return d["auc_per_class"][dotted.split(".", 1)[1]]
    return d[dotted]


# ---------------------------------------------------------------- classification metrics vs scikit-learn


@pytest.mark.parametrize("seed,round_to", [(0, None), (1, 2), (2, 1)])
def test_metrics_equal_sklearn(seed, round_to):
    y, p = make_data(seed=seed, round_to=round_to)
    m = classification_metrics(y, p)
    pred = p.argmax(axis=1)
    assert m["n"] == len(y)
    assert m["class_counts"] == {c: int((y == k).sum()) for k, c in enumerate(HER2_SCORES)}
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["f1_micro"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert m["f1_micro"] == pytest.approx(m["accuracy"])
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=[0, 1, 2, 3]).tolist()
    assert m["auc_macro_ovr"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    for k, c in enumerate(HER2_SCORES):
        assert m["auc_per_class"][c] == pytest.approx(roc_auc_score(y == k, p[:, k]))
    assert m["notes"] == []
    assert set(m) >= {"accuracy", "auc_macro_ovr", "auc_per_class", "f1_micro", "f1_macro", "qwk",
                      "confusion_matrix", "n", "class_counts", "endpoints", "notes"}


def test_missing_class_gives_note_not_crash():
    y, p = make_data(seed=3, classes=(0, 1, 2))  # no 3+ in this fold
    m = classification_metrics(y, p)
    assert m["auc_per_class"]["3+"] is None
    assert any("3+" in n and "absent" in n for n in m["notes"])
    present = [roc_auc_score(y == k, p[:, k]) for k in (0, 1, 2)]
    assert m["auc_macro_ovr"] == pytest.approx(np.mean(present))
    assert m["endpoints"]["her2_3plus_vs_rest"]["auc"] is None
    assert m["endpoints"]["her2_low_vs_positive"]["auc"] is None
    assert any("her2_3plus_vs_rest" in n for n in m["notes"])
    pred = p.argmax(axis=1)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    # ordinal distances kept with a class absent
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic", labels=[0, 1, 2, 3]))


def test_single_class_fold():
    y = np.full(10, 2)
    p = np.tile([0.1, 0.2, 0.6, 0.1], (10, 1))
    m = classification_metrics(y, p)
    assert m["auc_macro_ovr"] is None
    assert all(v is None for v in m["auc_per_class"].values())
    assert m["qwk"] is None and m["accuracy"] == 1.0
    assert m["notes"]


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError):
        classification_metrics([0, 1], np.ones((3, 4)) / 4)
    with pytest.raises(ValueError):
        classification_metrics([0, 4], np.ones((2, 4)) / 4)
    with pytest.raises(ValueError):
        classification_metrics([0, 1], np.full((2, 4), np.nan))


def test_endpoint_aucs_equal_sklearn_on_derived_problems():
    y, p = make_data(n=300, seed=5)
    ep = classification_metrics(y, p)["endpoints"]
    keep = y <= 2
    score = (p[keep, 1] + p[keep, 2]) / p[keep, :3].sum(axis=1)
    assert ep["her2_0_vs_low"]["auc"] == pytest.approx(roc_auc_score(y[keep] >= 1, score))
    assert ep["her2_0_vs_low"]["n"] == keep.sum()
    keep = y >= 1
    score = p[keep, 3] / p[keep, 1:].sum(axis=1)
    assert ep["her2_low_vs_positive"]["auc"] == pytest.approx(roc_auc_score(y[keep] == 3, score))
    assert ep["her2_3plus_vs_rest"]["auc"] == pytest.approx(roc_auc_score(y == 3, p[:, 3]))
    assert ep["her2_3plus_vs_rest"]["n_positive"] == (y == 3).sum()
    thresholds = [op["threshold"] for op in ep["her2_0_vs_low"]["operating_points"]]
    assert thresholds == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


def test_fpr_fnr_match_hand_computation():
    # truth:  P    P    P    N    N    N    N
    y_bin = np.array([1, 1, 1, 0, 0, 0, 0])
    score = np.array([0.9, 0.5, 0.2, 0.6, 0.5, 0.1, 0.05])
    ops = {o["threshold"]: o for o in operating_points(y_bin, score, thresholds=(0.5, 0.3, 0.95))}
    # t=0.5: positive calls = {0.9, 0.5(P), 0.6, 0.5(N)} -> TP 2, FN 1, FP 2, TN 2
    assert (ops[0.5]["tp"], ops[0.5]["fn"], ops[0.5]["fp"], ops[0.5]["tn"]) == (2, 1, 2, 2)
    assert ops[0.5]["fpr"] == pytest.approx(2 / 4) and ops[0.5]["fnr"] == pytest.approx(1 / 3)
    assert ops[0.3]["fpr"] == pytest.approx(2 / 4) and ops[0.3]["fnr"] == pytest.approx(1 / 3)
    assert ops[0.95]["fpr"] == 0.0 and ops[0.95]["fnr"] == 1.0
    assert operating_points(np.ones(3), np.ones(3), (0.5,))[0]["fpr"] is None


def test_endpoint_operating_points_from_probabilities():
    # 3+ vs rest at 0.5: slides with p3+ >= 0.5 are called positive
    y = np.array([3, 3, 0, 2])
    p = np.array([[0.1, 0.1, 0.1, 0.7], [0.4, 0.1, 0.1, 0.4], [0.2, 0.1, 0.1, 0.6], [0.7, 0.1, 0.1, 0.1]])
    op = [o for o in classification_metrics(y, p)["endpoints"]["her2_3plus_vs_rest"]["operating_points"]
          if o["threshold"] == 0.5][0]
    assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (1, 1, 1, 1)
    assert op["fpr"] == 0.5 and op["fnr"] == 0.5


# ---------------------------------------------------------------- folds


def test_summarize_folds_matches_numpy():
    folds = [classification_metrics(*make_data(n=80, seed=s)) for s in range(5)]
    folds.append(classification_metrics(*make_data(n=80, seed=9, classes=(0, 1, 2))))
    s = summarize_folds(folds)
    acc = [f["accuracy"] for f in folds]
    assert s["accuracy"]["mean"] == pytest.approx(np.mean(acc))
    assert s["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
    assert s["accuracy"]["per_fold"] == pytest.approx(acc)
    assert summarize_folds(folds, ddof=0)["qwk"]["std"] == pytest.approx(np.std([f["qwk"] for f in folds]))
    auc3 = [f["auc_per_class"]["3+"] for f in folds]
    assert auc3[-1] is None
    assert s["auc_per_class"]["3+"]["mean"] == pytest.approx(np.mean(auc3[:-1]))
    assert s["auc_per_class"]["3+"]["per_fold"][-1] is None
    assert any("auc_per_class[3+]" in n and "fold(s) [5]" in n for n in s["notes"])
    ep = [f["endpoints"]["her2_0_vs_low"]["auc"] for f in folds]
    assert s["endpoints"]["her2_0_vs_low"]["auc"]["mean"] == pytest.approx(np.mean(ep))
    assert s["confusion_matrix"] == np.sum([f["confusion_matrix"] for f in folds], axis=0).tolist()
    assert s["n"] == 6 * 80 and s["n_folds"] == 6
    fpr = [f["endpoints"]["her2_0_vs_low"]["operating_points"][4]["fpr"] for f in folds]
    assert s["endpoints"]["her2_0_vs_low"]["operating_points"][4]["fpr"]["mean"] == pytest.approx(np.mean(fpr))
    with_empty = summarize_folds([None] + folds[:2])  # a fold without slides does not crash the summary
    assert with_empty["accuracy"]["per_fold"][0] is None
    assert with_empty["accuracy"]["mean"] == pytest.approx(np.mean(acc[:2]))
    assert any("fold 0: no metrics" in n for n in with_empty["notes"])


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_reproducible_and_contains_estimate():
    y, p = make_data(n=200, seed=11)
    groups = np.repeat(np.arange(100), 2)
    a = bootstrap_ci(y, p, groups, n_boot=300, seed=7)
    b = bootstrap_ci(y, p, groups, n_boot=300, seed=7)
    c = bootstrap_ci(y, p, groups, n_boot=300, seed=8)
    assert a == b
    assert a != c
    m = classification_metrics(y, p)
    for key in DEFAULT_METRIC_KEYS:
        ci = a[key]
        assert ci["estimate"] == pytest.approx(get(m, key)), key  # fast functions == sklearn
        assert ci["lo"] <= ci["estimate"] <= ci["hi"], key
        assert ci["lo"] < ci["hi"]
        assert ci["n_valid"] == 300


def test_bootstrap_replicates_equal_sklearn():
    y, p = make_data(n=60, seed=2, round_to=1)
    prep = _Prepared(y, p)
    for idx, w in zip(bootstrap_indices(np.arange(60), 5, 0), bootstrap_weights(np.arange(60), 5, 0)):
        ref = classification_metrics(y[idx], p[idx])
        for key in DEFAULT_METRIC_KEYS:
            want = get(ref, key)
            got = _metric_function(key, prep)(w)
            if key == "auc_macro_ovr" and any(v is None for v in ref["auc_per_class"].values()):
                assert got is None
            else:
                assert got == pytest.approx(want), key


def test_bootstrap_resamples_patients_together():
    groups = ["p1", "p1", "p2", "p3", "p3", "p3", "p4"]
    for idx in bootstrap_indices(groups, 200, seed=1):
        counts = np.bincount(idx, minlength=len(groups))
        assert counts[0] == counts[1]
        assert counts[3] == counts[4] == counts[5]
    # Degenerate case: each patient has one right and one wrong slide, so any patient-level replicate has
    # accuracy exactly 0.5 (a slide-level bootstrap would not).
    y = np.array([0, 3] * 20)
    p = np.tile([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]], (20, 1))
    patients = np.repeat(np.arange(20), 2)
    ci = bootstrap_ci(y, p, patients, metric_keys=["accuracy"], n_boot=200, seed=0)["accuracy"]
    assert ci["estimate"] == ci["lo"] == ci["hi"] == 0.5
    slide_level = bootstrap_ci(y, p, None, metric_keys=["accuracy"], n_boot=200, seed=0)["accuracy"]
    assert slide_level["lo"] < 0.5 < slide_level["hi"]


def test_bootstrap_undefined_metric_and_bad_key():
    y, p = make_data(n=40, seed=4, classes=(0, 1, 2))
    ci = bootstrap_ci(y, p, None, metric_keys=["auc_per_class.3+", "auc_macro_ovr"], n_boot=50, seed=0)
    assert ci["auc_per_class.3+"] == {"estimate": None, "lo": None, "hi": None, "n_valid": 0, "n_boot": 50}
    assert ci["auc_macro_ovr"]["lo"] is not None
    with pytest.raises(ValueError):
        bootstrap_ci(y, p, None, metric_keys=["nonsense"], n_boot=5)


# ---------------------------------------------------------------- calibration


def _synthetic_probs(n, rng):
    conf = rng.uniform(0.3, 1.0, n)
    top = rng.integers(0, 4, n)
    p = np.tile(((1 - conf) / 3)[:, None], (1, 4))
    p[np.arange(n), top] = conf
    return p, top, conf


def test_ece_calibrated_near_zero_overconfident_larger():
    rng = np.random.default_rng(0)
    n = 20000
    p, top, conf = _synthetic_probs(n, rng)
    right = rng.uniform(size=n) < conf
    other = (top + rng.integers(1, 4, n)) % 4
    y_cal = np.where(right, top, other)
    ece_cal = expected_calibration_error(y_cal, p)
    right_over = rng.uniform(size=n) < conf - 0.25  # overconfident: right 25 points less often than claimed
    y_over = np.where(right_over, top, other)
    ece_over = expected_calibration_error(y_over, p)
    assert ece_cal < 0.02
    assert ece_over > 0.2
    summary = calibration_summary(y_over, p)
    assert summary["ece"] == pytest.approx(ece_over)
    assert sum(b["count"] for b in summary["bins"]) == n
    assert set(summary["per_class"]) == set(HER2_SCORES)
    onehot = np.eye(4)[y_over]
    assert summary["brier"] == pytest.approx(np.mean(((p - onehot) ** 2).sum(axis=1)))


def test_reliability_bins_edges():
    bins = reliability_bins([0.0, 0.1, 0.1001, 0.5, 1.0], [1, 0, 1, 1, 0], n_bins=10)
    assert [b["count"] for b in bins] == [2, 1, 0, 0, 1, 0, 0, 0, 0, 1]  # (lo, hi], 0 in the first bin
    assert bins[0]["accuracy"] == 0.5 and bins[0]["confidence"] == pytest.approx(0.05)
    assert bins[2]["accuracy"] is None


# ---------------------------------------------------------------- plots and report


def _check_png(path, min_w=300, min_h=200):
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.width >= min_w and img.height >= min_h
    arr = np.asarray(img.convert("L"))
    assert arr.std() > 5  # not blank
    assert (arr < 128).mean() > 0.005  # some dark ink (lines, text)


def test_plots_are_valid_pngs(tmp_path):
    y, p = make_data(n=120, seed=1)
    m = classification_metrics(y, p)
    _check_png(roc_curves_png(y, p, str(tmp_path / "roc.png")))
    y3, p3 = make_data(n=50, seed=2, classes=(0, 1, 2))
    _check_png(roc_curves_png(y3, p3, str(tmp_path / "roc_missing.png")))
    _check_png(confusion_png(m["confusion_matrix"], str(tmp_path / "cm.png")), min_w=600)
    _check_png(calibration_png(calibration_summary(y, p), str(tmp_path / "cal.png")))
    hist = {f: [{"epoch": e, "train_loss": 1.4 - 0.1 * e - 0.02 * f, "val_loss": 1.5 - 0.08 * e,
                 "val_auc": 0.5 + 0.04 * e + 0.01 * f} for e in range(10)] for f in range(3)}
    _check_png(training_curves_png(hist, str(tmp_path / "curves.png")), min_w=600)
    flat = [dict(r, fold=f) for f, rs in hist.items() for r in rs]
    _check_png(training_curves_png(flat, str(tmp_path / "curves_flat.png")), min_w=600)
    per_center = {}
    for c, seed in (("A", 1), ("B", 2)):
        yc, pc = make_data(n=60, seed=seed)
        per_center[c] = dict(classification_metrics(yc, pc), bootstrap_ci=bootstrap_ci(yc, pc, None, n_boot=50))
    _check_png(per_center_png(per_center, str(tmp_path / "centers.png")))


def test_markdown_report(tmp_path):
    y, p = make_data(n=100, seed=1)
    m = classification_metrics(y, p)
    folds = summarize_folds([classification_metrics(*make_data(n=50, seed=s)) for s in range(3)])
    ci = bootstrap_ci(y, p, None, n_boot=50)
    text = render_report(m, title="Test report", fold_summary=folds, bootstrap_ci=ci,
                         bootstrap_settings={"n_boot": 50, "seed": 0},
                         calibration=calibration_summary(y, p), images={"ROC": "roc.png"},
                         provenance={"her2ray": "0.1.0"}, notes=["hello note"],
                         matching={"n_evaluated": 100, "n_predictions": 101, "n_labelled": 100,
                                   "predictions_without_label": ["S-extra"]})
    for needle in ("# Test report", "## Metrics", "Quadratic weighted kappa", "±", "95% CI", "HER2 3+",
                   "### her2_0_vs_low", "| 0.5 |", "## Confusion matrix", "## Calibration", "![ROC](roc.png)",
                   "hello note", "## Provenance", "`S-extra`", f"{m['accuracy']:.3f}"):
        assert needle in text, needle
    # fold summary alone (training report): mean ± std, pooled confusion matrix, fold FPR/FNR table
    text2 = render_report(None, fold_summary=folds)
    assert "pooled over folds" in text2 and "FPR (mean ± std)" in text2
    out = write_report(str(tmp_path / "report.md"), text)
    assert open(out).read().startswith("# Test report")
