"""Trustworthy numbers: bit-identical reruns, post-hoc calibration and screening operating points.

The end-to-end checks train one planted cohort twice with real ``train_cv`` runs that differ in what must not
matter (ambient torch thread count, resource settings). Splits, stopping epochs, checkpoints, predictions and
metrics.json must be equal bit for bit. The Ray Train side (folds concurrent on Ray workers, one crashed and
resumed, vs an uninterrupted sequential local run) is checked the same way in
``tests/test_training.py::test_ray_folds_run_concurrently_and_resume_after_a_crash``. The same runs then carry the
calibration (held-out ECE) and operating-point checks, and ``score``/``evaluate`` are run on their outputs.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from her2ray.features.schema import feature_url
from her2ray.labels import PROB_COLUMNS, UNCAL_PROB_COLUMNS
from her2ray.reports.calibration import expected_calibration_error
from her2ray.reports.screening import column_name, parse_column, screening_summary
from her2ray.training import TrainConfig
from her2ray.training.calibration import Calibration, fit_calibration, load_calibration
from her2ray.training.operating_points import fit_operating_points, pick_threshold
from her2ray.training.run import train_cv
from her2ray.training.synthetic import make_feature_store

# ABMIL learns this cohort in 5 epochs; its bags still go through BagDataset's KMeans kernel plans.
TINY = dict(model="abmil", dim=32, npk=16, batch_size=2, lr=3e-3, abmil_dropout=0.1, folds=2, max_epochs=5,
            patience=3, seed=3)


def _write(path, rows) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """48 planted slides (strong signal): 36 for CV, 12 held out (3 per HER2 score, own patients)."""
    base = tmp_path_factory.mktemp("repro")
    info = make_feature_store(str(base / "store"), n_slides=48, n_tiles=48, dim=16, seed=5, signal=8.0,
                              signal_fraction=0.25)
    test = [r for i, r in enumerate(info["rows"]) if (i // 4) % 4 == 3]
    train = [r for r in info["rows"] if r not in test]
    return {"store": str(base / "store"), "train": _write(base / "train.csv", train),
            "test": _write(base / "test.csv", test), "base": base}


@pytest.fixture(scope="module")
def two_runs(cohort):
    """The same command twice, in Ray Train local mode: folds one after another in this process, with 1 and with 2
    ambient torch threads and other resource settings. (The Ray-worker side, folds concurrent and one of them
    crashed and resumed, is compared with a local run in tests/test_training.py.)"""
    out_a, out_b = str(cohort["base"] / "run_a"), str(cohort["base"] / "run_b")
    cfg = TrainConfig(cpus_per_fold=0.5, max_concurrent_folds=0, **TINY)
    old = torch.get_num_threads()
    try:
        for out, threads, c in ((out_a, 1, cfg), (out_b, 2, cfg.model_copy(update={"cpus_per_fold": 2.0,
                                                                                    "max_concurrent_folds": 1}))):
            torch.set_num_threads(threads)
            train_cv(cohort["store"], cohort["train"], out, c, test_manifest=cohort["test"], local=True)
    finally:
        torch.set_num_threads(old)
    return out_a, out_b


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def test_two_train_runs_with_other_thread_counts_are_bit_identical(two_runs):
    a, b = two_runs
    for name in ("splits.parquet", "oof_predictions.parquet", "test_predictions.parquet"):
        ta, tb = pq.read_table(os.path.join(a, name)), pq.read_table(os.path.join(b, name))
        assert ta.equals(tb), name                       # every float bit, every row, same order
    for name in ("metrics.json", "calibration.json", "operating_points.json"):
        assert _read(os.path.join(a, name)) == _read(os.path.join(b, name)), name
    for k in range(2):
        ra, rb = (json.loads(_read(os.path.join(run, "folds", f"fold-{k}", "result.json"))) for run in (a, b))
        assert (ra["best_epoch"], ra["epochs_run"]) == (rb["best_epoch"], rb["epochs_run"])
        assert [h["val_loss"] for h in ra["history"]] == [h["val_loss"] for h in rb["history"]]
        assert ra["compute"]["torch_threads"] == 1
        sa = torch.load(os.path.join(a, "folds", f"fold-{k}", "best.pt"), weights_only=True)["state_dict"]
        sb = torch.load(os.path.join(b, "folds", f"fold-{k}", "best.pt"), weights_only=True)["state_dict"]
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
    metrics = json.loads(_read(os.path.join(a, "metrics.json")))
    assert metrics["compute"] == {"torch_threads": 1, "deterministic_algorithms": False, "device": "cpu",
                                  "torch_version": torch.__version__}


def test_calibration_on_held_out_slides(two_runs):
    """Planted cohort: the short-trained ensemble is under-confident; calibration fixes it on held-out slides."""
    run = two_runs[0]
    t = pq.read_table(os.path.join(run, "test_predictions.parquet")).to_pydict()
    labels = {"0": 0, "1+": 1, "2+": 2, "3+": 3}
    y = np.array([labels[s] for s in t["her2_score"]])
    cal_p = np.column_stack([t[c] for c in PROB_COLUMNS])
    raw_p = np.column_stack([t[c] for c in UNCAL_PROB_COLUMNS])
    ece_cal, ece_raw = expected_calibration_error(y, cal_p), expected_calibration_error(y, raw_p)
    assert ece_cal <= 0.1 and ece_cal < ece_raw, (ece_cal, ece_raw)
    assert np.array_equal(cal_p.argmax(1), raw_p.argmax(1))        # accuracy unchanged
    cal = load_calibration(run)
    assert cal.method == "temperature" and cal.temperature < 1     # sharpened an under-confident ensemble
    metrics = json.loads(_read(os.path.join(run, "metrics.json")))
    assert metrics["calibration"]["test"]["after"]["ece"] == pytest.approx(ece_cal)
    assert metrics["calibration"]["fit"]["cv_nll"]["temperature"] is not None
    print(f"held-out ECE uncalibrated {ece_raw:.3f} -> calibrated {ece_cal:.3f} (T = {cal.temperature:.3f})")


def test_operating_points_reach_their_targets_out_of_fold(two_runs):
    run = two_runs[0]
    points = json.loads(_read(os.path.join(run, "operating_points.json")))["operating_points"]
    assert [p["column"] for p in points] == [column_name(e, s) for e in ("her2_0_vs_low", "her2_low_vs_positive")
                                             for s in (0.9, 0.95)]
    for p in points:
        assert p["oof_sensitivity"] >= p["target_sensitivity"] and p["threshold"] is not None
    oof = pq.read_table(os.path.join(run, "oof_predictions.parquet")).to_pydict()
    assert set(p["column"] for p in points) <= set(oof)
    metrics = json.loads(_read(os.path.join(run, "metrics.json")))
    tested = metrics["operating_points"][0]["test"]
    assert tested["n_positive"] == 6 and tested["n_negative"] == 3 and tested["sensitivity"]["estimate"] is not None


def test_score_and_evaluate_apply_calibration_and_flags(two_runs, cohort, tmp_path):
    """The scoring engine reproduces training's calibrated test predictions and flags; evaluate reports both
    calibrations and the operating points with patient-bootstrap CIs."""
    from her2ray.reports.evaluate import evaluate_predictions
    from her2ray.scoring.engine import FoldEnsemble, rows_to_table, score_slide

    run = two_runs[0]
    ens = FoldEnsemble.from_run(run)
    assert ens.calibration.method == "temperature" and len(ens.flag_columns) == 4
    expected = pq.read_table(os.path.join(run, "test_predictions.parquet")).to_pylist()
    rows = [score_slide(ens, r["slide_id"], feature_url(cohort["store"], r["slide_id"])) for r in expected]
    for got, want in zip(rows, expected):
        assert got["status"] == "ok"
        for c in PROB_COLUMNS + UNCAL_PROB_COLUMNS:
            assert got[c] == pytest.approx(want[c], abs=1e-6)
        assert all(got[c] == want[c] for c in ens.flag_columns)
    table = rows_to_table(rows, ens.schema)
    pq.write_table(table, tmp_path / "predictions.parquet")
    res = evaluate_predictions(str(tmp_path / "predictions.parquet"), cohort["test"], str(tmp_path / "eval"),
                               n_boot=200)
    change = res["calibration_change"]
    assert change["after"]["ece"] < change["before"]["ece"]
    assert {s["column"] for s in res["screening"]} == set(ens.flag_columns)
    s0 = res["screening"][0]
    assert s0["sensitivity"]["lo"] <= s0["sensitivity"]["estimate"] <= s0["sensitivity"]["hi"]
    assert (tmp_path / "eval" / "calibration_uncalibrated.png").exists()
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "Screening operating points" in report and "prob_uncal_her2_*" in report


# ------------------------------------------------------------------------------------------ pure functions
def _planted_logits(n=600, a_true=3.0, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    p_true = np.exp(z * a_true) / np.exp(z * a_true).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p_true])
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)       # the "model": right ranking, temperature 3x too hot
    return probs, y, rng.integers(0, 5, n)


def test_temperature_scaling_recovers_a_planted_temperature_deterministically():
    probs, y, folds = _planted_logits()
    a = fit_calibration(probs, y, folds, method="temperature")
    b = fit_calibration(probs, y, folds, method="temperature")
    assert a.to_dict() == b.to_dict()
    assert 1 / a.temperature == pytest.approx(3.0, rel=0.15)
    assert a.fit["oof_after"]["nll"] < a.fit["oof_before"]["nll"]
    assert np.array_equal(a.apply(probs).argmax(1), probs.argmax(1))


def test_auto_prefers_vector_scaling_only_when_clearly_better():
    probs, y, folds = _planted_logits()
    assert fit_calibration(probs, y, folds).method == "temperature"    # temperature is the true family
    biased = probs * np.array([4.0, 1.0, 1.0, 0.25])                  # a per-class bias temperature cannot fix
    biased /= biased.sum(1, keepdims=True)
    vec = fit_calibration(biased, y, folds)
    assert vec.method == "vector" and vec.fit["cv_nll"]["vector"] < vec.fit["cv_nll"]["temperature"] - 0.02
    assert Calibration.from_dict(json.loads(json.dumps(vec.to_dict()))).apply(biased) == pytest.approx(
        vec.apply(biased))


def test_threshold_rule_and_flag_columns():
    y_bin = np.array([1, 1, 1, 1, 0, 0, 0])
    score = np.array([0.9, 0.8, 0.4, 0.2, 0.5, 0.1, 0.3])
    assert pick_threshold(y_bin, score, 0.75) == 0.4                # 3 of 4 positives, highest such threshold
    assert pick_threshold(y_bin, score, 0.95) == 0.2
    assert parse_column(column_name("her2_0_vs_low", 0.975)) == ("her2_0_vs_low", 0.975)
    assert parse_column("screen_nonsense_sens90") is None and parse_column("prob_her2_0") is None
    y = np.array([0, 0, 1, 2, 3, 3])
    probs = np.array([[.7, .1, .1, .1], [.2, .5, .2, .1], [.1, .6, .2, .1], [.1, .1, .7, .1], [.1, .1, .1, .7],
                      [.1, .5, .1, .3]])
    points = fit_operating_points(y, probs, ["her2_low_vs_positive"], [0.5])
    assert points[0]["threshold"] == pytest.approx(0.7 / 0.9) and points[0]["oof_sensitivity"] == 0.5
    summary = screening_summary(y, {points[0]["column"]: probs[:, 3] >= 0.7}, groups=list("aabbcc"), n_boot=50)
    assert summary[0]["sensitivity"]["estimate"] == 0.5 and summary[0]["specificity"]["estimate"] == 1.0


# ------------------------------------------------------------------------------------------ embedding
def test_re_embedding_with_other_thread_counts_is_bit_identical(tmp_path):
    """Same slide, same encoder, 1 vs 2 torch threads (what CPU actors of 1 or 2 CPUs get): same float16 bits."""
    from open_clip.model import _build_vision_tower

    from her2ray.encoders import write_open_clip_dir
    from her2ray.features.embed import EmbedConfig, embed_slide, load_engine_encoder
    from her2ray.features.schema import read_slide_features
    from her2ray.synth import write_synthetic_slide

    # Big enough for multi-threaded GEMMs (196 tokens x width 128), small enough for a second on CPU.
    arch = {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 16, "head_width": 32}}
    torch.manual_seed(11)
    tower = _build_vision_tower(arch["embed_dim"], arch["vision_cfg"], quick_gelu=True)
    weights = write_open_clip_dir(tower.state_dict(), arch, str(tmp_path / "enc"))
    slide = write_synthetic_slide(str(tmp_path / "s.tiff"), 1024, 1024, seed=4, label=2)
    cfg = EmbedConfig(encoder="open_clip", weights=weights, device="cpu", precision="fp32")
    encoder = load_engine_encoder(cfg)
    feats = {}
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            store = str(tmp_path / f"store{threads}")
            assert embed_slide({"slide_id": "s", "path": slide}, encoder, cfg, store)["status"] == "ok"
            sf = read_slide_features(feature_url(store, "s"))
            assert sf.meta.extra["torch_threads"] == threads
            feats[threads] = sf.features
    finally:
        torch.set_num_threads(old)
    assert len(feats[1]) > 8 and feats[1].dtype == feats[2].dtype
    assert np.array_equal(feats[1].view(np.uint8), feats[2].view(np.uint8))
