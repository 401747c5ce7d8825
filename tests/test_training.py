"""Training: config, inputs, the fold engine (learning, no false signal, resume), outputs, Ray Train folds.

Feature stores are generated through the real feature-file contract with a planted tile-level signal (5% of a
slide's tiles shifted along a class direction), so every loader under test is the production one.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from her2ray import storage
from her2ray.cli import main
from her2ray.errors import ConfigError, ManifestError
from her2ray.features.schema import feature_url
from her2ray.labels import PROB_COLUMNS, UNCAL_PROB_COLUMNS
from her2ray.training import TrainConfig, load_best_model, load_fold_models
from her2ray.training.loop import FoldSpec, InjectedFailure, class_weights, is_improvement, train_fold
from her2ray.training.run import FAIL_HOOK_ENV, TrainingFailedError, prepare_inputs, train_cv
from her2ray.training.synthetic import make_feature_store

SMALL = dict(dim=64, depth=2, heads=4, dim_head=16, mlp_dim=128, npk=16, batch_size=4, lr=2e-3, dropout=0.1,
             abmil_dropout=0.1)


@pytest.fixture(autouse=True)
def only_train_stage(monkeypatch):
    """Other stages' CLI modules are written in parallel; build the parser with ours alone."""
    import her2ray.cli as cli

    monkeypatch.setattr(cli, "STAGES", ("train",))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("stores")
    out = {}
    for name, signal in (("signal", 8.0), ("null", 0.0)):
        make_feature_store(str(base / name), n_slides=56, n_tiles=64, dim=32, seed=1, signal=signal)
        out[name] = str(base / name)
    return out


def _spec(store, tmp_path, model, max_epochs=12, patience=12, **over) -> FoldSpec:
    rows = [(f"S{i:04d}", i % 4) for i in range(56)]

    def part(rs):
        return [r[0] for r in rs], [feature_url(store, r[0]) for r in rs], [r[1] for r in rs]

    (tri, tru, trl), (vai, vau, val), (tei, teu, tel) = part(rows[:32]), part(rows[32:44]), part(rows[44:])
    cfg = TrainConfig(model=model, max_epochs=max_epochs, patience=patience, **{**SMALL, **over})
    return FoldSpec(fold=0, out_dir=str(tmp_path / "fold-0"), config=cfg.to_dict(), patch_dim=32, seed=0,
                    train_ids=tri, train_urls=tru, train_labels=trl, val_ids=vai, val_urls=vau, val_labels=val,
                    test_ids=tei, test_urls=teu, test_labels=tel)


# ------------------------------------------------------------------------------------------- config
def test_config_official_defaults_and_validation(tmp_path):
    cfg = TrainConfig()
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.mlp_dim, cfg.npk, cfg.max_nodes) == \
        (256, 4, 8, 64, 512, 144, 4096)
    assert (cfg.dropout, cfg.lr, cfg.aug_rate, cfg.balance, cfg.folds, cfg.model) == \
        (0.5, 1e-4, 0.5, "sampler", 5, "kat")
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_mapping({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="together"):
        TrainConfig.from_mapping({"train_centers": ["A"]})
    with pytest.raises(ConfigError, match="both"):
        TrainConfig.from_mapping({"train_centers": ["A"], "test_centers": ["A"]})
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  model: abmil\n  folds: 3\n  lr: 0.001\n")
    assert TrainConfig.from_yaml(str(y), section="train").folds == 3


def test_cli_flags_override_yaml_and_reject_unknown_keys(tmp_path, capsys):
    from her2ray.cli import build_parser
    from her2ray.cli.train import config_from_args

    y = tmp_path / "c.yaml"
    y.write_text("train:\n  model: abmil\n  folds: 3\n  lr: 0.001\n")
    args = build_parser().parse_args(["train", "--features", "f", "--manifest", "m", "--out", "o", "--config",
                                      str(y), "--folds", "4", "--train-centers", "A,B", "--test-centers", "C",
                                      "--gpus-per-fold", "0.25", "--split-by", "center"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.folds, cfg.lr, cfg.train_centers, cfg.test_centers, cfg.gpus_per_fold, cfg.split_by) == \
        ("abmil", 4, 0.001, ["A", "B"], ["C"], 0.25, "center")
    y.write_text("train:\n  epochs: 3\n")
    rc = main(["train", "--features", "f", "--manifest", "m", "--out", str(tmp_path / "o"), "--config", str(y)])
    assert rc == 2 and "epochs" in capsys.readouterr().err


def test_bad_label_is_manifest_error_naming_file_row_column(tmp_path, stores):
    m = tmp_path / "bad.csv"
    m.write_text("slide_id,her2_score,patient_id\nS0000,0,P0\nS0001,4+,P1\n")
    with pytest.raises(ManifestError) as exc:
        prepare_inputs(stores["signal"], str(m), TrainConfig())
    assert exc.value.row == 2 and exc.value.column == "her2_score" and str(m) in str(exc.value)
    rc = main(["train", "--features", stores["signal"], "--manifest", str(m), "--out", str(tmp_path / "o")])
    assert rc == 2


# ------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("model", ["kat", "abmil"])
def test_planted_signal_is_learned_on_held_out_slides(stores, tmp_path, model):
    res = train_fold(_spec(stores["signal"], tmp_path, model))
    assert res["test_metrics"]["auc_macro_ovr"] >= 0.9, res["history"]
    assert res["best_val_auc"] >= 0.9
    # best.pt reloads into the same predictions as the fold wrote
    m, ckpt = load_best_model(str(tmp_path / "fold-0" / "best.pt"))
    assert ckpt["model_name"] == model and ckpt["epoch"] == res["best_epoch"] and ckpt["patch_dim"] == 32
    preds = pq.read_table(tmp_path / "fold-0" / "test_predictions.parquet").to_pylist()
    assert len(preds) == 12 and abs(sum(preds[0][c] for c in PROB_COLUMNS) - 1) < 1e-6


def test_no_signal_stays_near_chance(stores, tmp_path):
    res = train_fold(_spec(stores["null"], tmp_path, "kat", max_epochs=6, patience=3))
    assert res["test_metrics"]["auc_macro_ovr"] < 0.75


def test_resume_from_checkpoint_after_a_crash_mid_fold(stores, tmp_path):
    saved = {}

    def on_epoch_end(state, metrics):
        saved["state"] = state

    spec = _spec(stores["signal"], tmp_path, "abmil", max_epochs=4, patience=10)
    spec.fail_after_epoch = 2
    with pytest.raises(InjectedFailure):
        train_fold(spec, on_epoch_end=on_epoch_end)
    assert saved["state"]["epoch"] == 2 and not (tmp_path / "fold-0" / "DONE").exists()
    res = train_fold(spec, resume_state=saved["state"], on_epoch_end=on_epoch_end)
    assert res["start_epoch"] == 2 and res["epochs_run"] == 4
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2, 3]
    assert (tmp_path / "fold-0" / "DONE").exists()


def test_early_stopping_and_loss_balancing(stores, tmp_path):
    res = train_fold(_spec(stores["null"], tmp_path, "abmil", max_epochs=30, patience=2, balance="loss"))
    assert res["stopped_early"] and res["epochs_run"] < 30
    assert res["epochs_run"] - 1 - res["best_epoch"] == 2
    w = class_weights([0, 0, 0, 1])
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0, 0.0, 0.0]))
    assert is_improvement(0.8, 1.0, 0.7, 0.1) and not is_improvement(0.7, 1.0, 0.8, 2.0)
    assert is_improvement(0.8, 0.5, 0.8, 0.6) and not is_improvement(0.8, 0.7, 0.8, 0.6)


# ------------------------------------------------------------------------------------------- run outputs
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """24 cv slides (2 per patient) + 8 test slides; one failed, one without features."""
    base = tmp_path_factory.mktemp("cohort")
    store = str(base / "store")
    info = make_feature_store(store, n_slides=32, n_tiles=36, dim=32, seed=2, signal=8.0, slides_per_patient=2,
                              failed=("S0003",), missing=("S0030",))
    rows = info["rows"]
    paths = {}
    for name, part in (("train", rows[:24]), ("test", rows[24:])):
        p = base / f"{name}.csv"
        with open(p, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(part[0]))
            w.writeheader()
            w.writerows(part)
        paths[name] = str(p)
    return {"store": store, **paths}


def test_local_cv_run_writes_every_output(cohort, tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = TrainConfig(model="abmil", folds=2, max_epochs=2, patience=5, **SMALL)
    summary = train_cv(cohort["store"], cohort["train"], out, cfg, test_manifest=cohort["test"], local=True)
    err = capsys.readouterr().err
    assert "S0003" in err and "S0030" in err and "no feature file" in err
    excluded = {e["slide_id"]: e["reason"] for e in summary["excluded"]}
    assert set(excluded) == {"S0003", "S0030"} and "failed" in excluded["S0003"]
    assert pq.read_table(os.path.join(out, "excluded_slides.parquet")).num_rows == 2

    splits = pq.read_table(os.path.join(out, "splits.parquet")).to_pylist()
    assert {r["fold"] for r in splits} == {-1, 0, 1} and "S0003" not in {r["slide_id"] for r in splits}

    oof = pq.read_table(os.path.join(out, "oof_predictions.parquet")).to_pandas()
    assert list(oof.columns[:5]) == ["slide_id", "patient_id", "center", "fold", "her2_score"]
    assert set(PROB_COLUMNS) <= set(oof.columns) and "pred_score" in oof.columns and len(oof) == 23
    test = pq.read_table(os.path.join(out, "test_predictions.parquet")).to_pandas()
    assert {"fold0_prob_her2_0", "fold1_prob_her2_3plus", "prob_her2_2plus", "pred_score"} <= set(test.columns)
    assert len(test) == 7
    np.testing.assert_allclose(test["prob_uncal_her2_0"], (test["fold0_prob_her2_0"] + test["fold1_prob_her2_0"]) / 2)
    # prob_her2_* = calibration.json applied to each fold, then averaged
    from her2ray.training.calibration import load_calibration
    cal = load_calibration(out)
    folds_p = np.stack([test[[f"fold{k}_{c}" for c in PROB_COLUMNS]].to_numpy() for k in (0, 1)])
    np.testing.assert_allclose(test[list(PROB_COLUMNS)].to_numpy(), cal.apply_ensemble(folds_p))

    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    y = oof["her2_score"].map({"0": 0, "1+": 1, "2+": 2, "3+": 3}).to_numpy()
    expected = roc_auc_score(y, oof[list(PROB_COLUMNS)].to_numpy(), multi_class="ovr", average="macro")
    assert metrics["oof"]["auc_macro_ovr"] == pytest.approx(expected)
    assert metrics["val"]["auc_macro_ovr"]["per_fold"] == [f["val"]["auc_macro_ovr"] for f in metrics["folds"]]
    assert metrics["test_ensemble"]["n"] == 7 and metrics["test"]["n_folds"] == 2
    for png in ("roc_oof.png", "confusion_oof.png", "training_curves.png", "roc_test.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    report = open(os.path.join(out, "report.md")).read()
    assert "S0003" in report and "Held-out test set" in report
    run = json.loads(open(os.path.join(out, "run.json")).read())
    assert run["status"] == "done" and run["encoder"]["name"] == "synthetic" and run["config"]["model"] == "abmil"

    models = load_fold_models(out)
    assert [k for k, _ in models] == [0, 1]
    # the loaded fold-0 model reproduces its out-of-fold probabilities
    from her2ray.models.bags import BagDataset, collate_bags
    sid = oof[oof.fold == 0].slide_id.iloc[0]
    batch = collate_bags([BagDataset([feature_url(cohort["store"], sid)], [0], npk=16)[0]])
    with torch.no_grad():
        p = torch.softmax(models[0][1](batch["features"], batch["anchor_dist"], batch["tile_mask"],
                                       batch["kernel_mask"]), 1)[0].numpy()
    np.testing.assert_allclose(p, oof[oof.slide_id == sid][list(UNCAL_PROB_COLUMNS)].to_numpy()[0], atol=1e-5)

    # a finished run is not retrained; another protocol on the same folder is refused
    again = train_cv(cohort["store"], cohort["train"], out, cfg, test_manifest=cohort["test"], local=True)
    assert all(f["skipped"] for f in again["folds"].values())
    with pytest.raises(ConfigError, match="different configuration"):
        train_cv(cohort["store"], cohort["train"], out, cfg.model_copy(update={"lr": 0.1}),
                 test_manifest=cohort["test"], local=True)


def test_external_validation_by_center_in_one_command(tmp_path):
    store = str(tmp_path / "store")
    info = make_feature_store(store, n_slides=24, n_tiles=25, dim=32, seed=3, signal=8.0, n_centers=3)
    out = str(tmp_path / "run")
    cfg = TrainConfig(model="abmil", folds=2, max_epochs=1, patience=2, train_centers=["C0", "C1"],
                      test_centers=["C2"], split_by="center", **SMALL)
    train_cv(store, info["manifest"], out, cfg, local=True)
    splits = pq.read_table(os.path.join(out, "splits.parquet")).to_pylist()
    by_fold: dict[int, set] = {}
    for r in splits:
        by_fold.setdefault(r["fold"], set()).add(r["center"])
    assert by_fold == {-1: {"C2"}, 0: {"C0"}, 1: {"C1"}}   # leave-one-center-out inside the train centers
    test = pq.read_table(os.path.join(out, "test_predictions.parquet")).to_pylist()
    assert {r["center"] for r in test} == {"C2"} and len(test) == 8


# ------------------------------------------------------------------------------------------- Ray Train
def test_ray_folds_run_concurrently_and_resume_after_a_crash(ray_session, cohort, tmp_path, monkeypatch, capsys):
    """Real Ray Train V2: 2 TorchTrainer folds in parallel; fold 1 dies after epoch 0, a rerun resumes it."""
    out = str(tmp_path / "run")
    cfg = TrainConfig(model="abmil", folds=2, max_epochs=2, patience=5, cpus_per_fold=1, max_failures=0, **SMALL)
    monkeypatch.setenv(FAIL_HOOK_ENV, "1:1")
    with pytest.raises(TrainingFailedError, match="fold 1"):
        train_cv(cohort["store"], cohort["train"], out, cfg, test_manifest=cohort["test"])
    assert os.path.exists(os.path.join(out, "folds", "fold-0", "DONE"))
    assert not os.path.exists(os.path.join(out, "folds", "fold-1", "DONE"))
    assert json.loads(open(os.path.join(out, "run.json")).read())["status"] == "failed"

    monkeypatch.delenv(FAIL_HOOK_ENV)
    rc = main(["train", "--features", cohort["store"], "--manifest", cohort["train"], "--test-manifest",
               cohort["test"], "--out", out, "--model", "abmil", "--folds", "2", "--max-epochs", "2",
               "--patience", "5", "--cpus-per-fold", "1", "--dim", "64", "--depth", "2", "--heads", "4",
               "--dim-head", "16", "--mlp-dim", "128", "--npk", "16", "--batch-size", "4", "--lr", "0.002",
               "--dropout", "0.1", "--config", _abmil_yaml(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fold 0: skipped (done)" in printed and "fold 1: epochs 1..1" in printed
    r0 = json.loads(open(os.path.join(out, "folds", "fold-0", "result.json")).read())
    r1 = json.loads(open(os.path.join(out, "folds", "fold-1", "result.json")).read())
    assert r1["start_epoch"] == 1 and r1["epochs_run"] == 2 and len(r1["history"]) == 2
    # concurrency: fold 1's first attempt (start .. end of its epoch 0) overlaps fold 0's run
    assert r1["first_started_at"] < r0["finished_at"] and r0["started_at"] < r1["history"][0]["ended_at"]
    assert r0["pid"] != r1["pid"]  # separate Ray Train worker processes
    assert os.path.exists(os.path.join(out, "metrics.json")) and len(load_fold_models(out)) == 2
    # the crashed-and-resumed concurrent Ray run equals an uninterrupted sequential local run, bit for bit
    ref = str(tmp_path / "local")
    train_cv(cohort["store"], cohort["train"], ref, cfg, test_manifest=cohort["test"], local=True)
    for name in ("splits.parquet", "oof_predictions.parquet", "test_predictions.parquet"):
        assert pq.read_table(os.path.join(out, name)).equals(pq.read_table(os.path.join(ref, name))), name
    for name in ("metrics.json", "calibration.json", "operating_points.json"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(ref, name)).read(), name
    for k in (0, 1):
        ra, rb = (json.loads(open(os.path.join(d, "folds", f"fold-{k}", "result.json")).read()) for d in (out, ref))
        assert (ra["best_epoch"], ra["compute"]) == (rb["best_epoch"], rb["compute"])
        sa, sb = (torch.load(os.path.join(d, "folds", f"fold-{k}", "best.pt"), weights_only=True)["state_dict"]
                  for d in (out, ref))
        assert all(torch.equal(sa[n], sb[n]) for n in sa)


def _abmil_yaml(tmp_path) -> str:
    p = tmp_path / "train.yaml"
    p.write_text("train:\n  abmil_dropout: 0.1\n")
    return str(p)


@pytest.mark.slow  # a second real Ray Train run (~20 s idle, minutes on a loaded 2-core box)
def test_ray_run_to_s3(ray_session, s3_bucket, cohort):
    """Outputs, Ray Train checkpoints and best.pt on an S3 store (moto server), then reloaded from there."""
    out = f"{s3_bucket}/runs/r1"
    cfg = TrainConfig(model="abmil", folds=2, max_epochs=1, patience=5, cpus_per_fold=1, **SMALL)
    summary = train_cv(cohort["store"], cohort["train"], out, cfg)
    assert set(summary["folds"]) == {0, 1}
    fs, path = storage.filesystem_for(out)
    names = {p.rsplit("/", 1)[-1] for p in fs.find(path)}
    assert {"best.pt", "DONE", "metrics.json", "oof_predictions.parquet", "report.md", "splits.parquet",
            "state.pt"} <= names
    assert [k for k, _ in load_fold_models(out)] == [0, 1]


def test_missing_gpu_fails_fast_on_a_local_ray(ray_session):
    from her2ray.training.run import check_cluster_resources

    with pytest.raises(ConfigError, match="GPU"):
        check_cluster_resources(TrainConfig(gpus_per_fold=0.5))
    check_cluster_resources(TrainConfig(cpus_per_fold=0.4))
