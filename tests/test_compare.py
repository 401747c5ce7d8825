"""Table 2: ``jobs.paper_table2`` plans the runs, ``her2ray compare`` builds the table and the paired comparison.

The runs are real ``train_cv`` runs (local mode, tiny sizes) of KAT and SlideGraph+ on a synthetic two-cohort
feature store (planted signal; first half of the slides = cohort A, second half = B), wired as the job wires them.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from her2ray.cli import main
from her2ray.errors import ConfigError
from her2ray.labels import PROB_COLUMNS, parse_her2_score
from her2ray.reports.metrics import classification_metrics
from her2ray.reports.bootstrap import paired_bootstrap_diff
from her2ray.reports.compare import compare_runs, parse_spec
from her2ray.training.config import TrainConfig
from her2ray.training.run import train_cv
from her2ray.training.synthetic import make_feature_store

TINY = dict(folds=2, max_epochs=3, patience=3, batch_size=8, cpus_per_fold=1)
MODEL = {"kat": dict(dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64, npk=8, lr=2e-3, dropout=0.1),
         "slidegraph": dict(lr=3e-3, weight_decay=1e-4, aug_rate=0.0, graph_lambda_f=0.1)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _two_cohorts(manifest: str, folder) -> tuple[str, str]:
    """First half of the slides = cohort A, second half = cohort B (every HER2 score in both)."""
    with open(manifest) as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for name, part in (("A", rows[: len(rows) // 2]), ("B", rows[len(rows) // 2:])):
        path = folder / f"cohort_{name}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({**r, "center": name} for r in part)
        out.append(str(path))
    return out[0], out[1]


@pytest.fixture(scope="module")
def table2_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("t2")
    store = str(base / "store")
    info = make_feature_store(store, n_slides=32, n_tiles=16, dim=16, seed=4, signal=8.0)
    cohort_a, cohort_b = _two_cohorts(info["manifest"], base)
    specs = []
    for model in ("kat", "slidegraph"):
        cfg = TrainConfig(model=model, **TINY, **MODEL[model])
        ab = str(base / f"{model}_a_to_b")   # one run gives two columns: CV on A and train A / test B
        train_cv(store, cohort_a, ab, cfg, test_manifest=cohort_b, local=True)
        specs += [f"cv_a={ab}", f"a_to_b={ab}"]
    return {"base": base, "specs": specs, "store": store, "a": cohort_a, "b": cohort_b}


def test_compare_writes_table2_with_paper_numbers_and_paired_test(table2_runs, capsys):
    out = table2_runs["base"] / "table2"
    assert main(["compare", *table2_runs["specs"], "--out", str(out), "--n-boot", "200"]) == 0
    result = json.loads((out / "compare.json").read_text())
    rows = {(r["model"], r["setting"]): r for r in result["rows"]}
    assert set(rows) == {(m, s) for m in ("kat", "slidegraph") for s in ("cv_a", "a_to_b")}
    assert rows[("kat", "cv_a")]["published_auc"] == {"mean": 0.795, "std": 0.028}
    assert rows[("slidegraph", "a_to_b")]["published_auc"]["mean"] == 0.564
    for r in rows.values():
        assert r["n_folds"] == 2 and len(r["auc_macro_ovr"]["per_fold"]) == 2
        assert 0 <= r["accuracy"]["mean"] <= 1 and r["auc_macro_ovr"]["std"] is not None
    # the table's numbers are the runs' own: fold metrics from metrics.json, pooled AUCs from the predictions
    base = table2_runs["base"]
    for model in ("kat", "slidegraph"):
        m = json.loads((base / f"{model}_a_to_b" / "metrics.json").read_text())
        assert rows[(model, "cv_a")]["auc_macro_ovr"]["per_fold"] == [f["val"]["auc_macro_ovr"] for f in m["folds"]]
        assert rows[(model, "a_to_b")]["accuracy"]["per_fold"] == [f["test"]["accuracy"] for f in m["folds"]]
        assert rows[(model, "cv_a")]["auc_macro_ovr"]["mean"] == pytest.approx(np.mean(
            [f["val"]["auc_macro_ovr"] for f in m["folds"]]))
    pooled = {}
    for model in ("kat", "slidegraph"):
        t = pq.read_table(base / f"{model}_a_to_b" / "test_predictions.parquet").to_pylist()
        y = [parse_her2_score(r["her2_score"]) for r in t]
        pooled[model] = classification_metrics(y, [[r[c] for c in PROB_COLUMNS] for r in t])["auc_macro_ovr"]
    assert rows[("kat", "a_to_b")]["n_slides"] == 16 and rows[("kat", "cv_a")]["n_slides"] == 16
    paired = {c["setting"]: c for c in result["paired"]}
    assert set(paired) == {"cv_a", "a_to_b"}
    assert paired["a_to_b"]["bootstrap"]["diff"] == pytest.approx(pooled["kat"] - pooled["slidegraph"])
    for c in paired.values():
        assert c["same_folds"] and c["n_common_slides"] == 16
        b = c["bootstrap"]
        assert b["lo"] <= b["diff"] <= b["hi"] and 0 <= b["p_value"] <= 1
        assert len(c["fold_auc_diff"]["per_fold"]) == 2
    # SlideGraph+ built each of the 32 slide graphs once (before the folds), into the cache beside the features
    assert len(list((base / "store" / "graphs").glob("*.npz"))) == 32
    text = (out / "table2.md").read_text()
    assert "| KAT | CV on cohort A" in text and "0.795 ± 0.028" in text and "Paired comparison" in text
    assert (out / "roc_compare.png").stat().st_size > 10_000
    assert "Table 2" in capsys.readouterr().out
    print(text)   # shown with -s: the numbers quoted in the README


def test_paired_bootstrap_detects_a_better_model_and_not_an_equal_one():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    good = np.eye(4)[y] * 3 + rng.normal(size=(120, 4))
    bad = rng.normal(size=(120, 4))
    soft = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    better = paired_bootstrap_diff(y, soft(good), soft(bad), n_boot=300, seed=1)
    assert better["diff"] > 0.3 and better["lo"] > 0 and better["p_value"] < 0.01
    same = paired_bootstrap_diff(y, soft(good), soft(good), n_boot=50, seed=1)
    assert same["diff"] == 0 and same["p_value"] == 1.0


def test_bad_specs_and_missing_test_sets_are_config_errors(table2_runs):
    with pytest.raises(ConfigError, match="SETTING=RUN"):
        parse_spec("runs/kat")
    cv_only = table2_runs["base"] / "cv_only"          # a run without a test set: metrics["test"] is null
    cv_only.mkdir()
    metrics = json.loads((table2_runs["base"] / "kat_a_to_b" / "metrics.json").read_text())
    (cv_only / "metrics.json").write_text(json.dumps({**metrics, "test": None}))
    with pytest.raises(ConfigError, match="held-out test set"):
        compare_runs([f"a_to_b={cv_only}"], str(table2_runs["base"] / "x"))
    with pytest.raises(ConfigError, match="two runs"):
        compare_runs(table2_runs["specs"][:1] * 2, str(table2_runs["base"] / "y"))


def test_paper_table2_job_plans_both_models_and_validates_options(table2_runs, tmp_path, capsys):
    from jobs.paper_table2 import main as job_main

    cfg = tmp_path / "t2.yaml"
    cfg.write_text(f"features: {table2_runs['store']}\ncohort_a: {table2_runs['a']}\ncohort_b: {table2_runs['b']}\n"
                   f"out: {tmp_path / 'runs'}\ntrain: {{folds: 2, seed: 3}}\n"
                   "model_options: {slidegraph: {lr: 0.001, graph_lambda_f: 0.1}}\n")
    assert job_main(["--config", str(cfg), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("her2ray compare cv_a=")
    assert sum("--model slidegraph" in ln and "--graph-lambda-f 0.1" in ln for ln in lines) == 2
    assert "--test-manifest" in lines[0] and "--test-manifest" not in lines[1]
    cfg.write_text(cfg.read_text().replace("seed: 3", "seed: 3, epochs: 2"))
    assert job_main(["--config", str(cfg), "--dry-run"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_shipped_paper_table2_config_validates(capsys):
    from pathlib import Path

    from jobs.paper_table2 import main as job_main

    cfg = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "paper_table2.yaml"
    assert job_main(["--config", str(cfg), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[1] for ln in lines] == ["train"] * 4 + ["compare"]
    assert sum("--lr 0.001 --weight-decay 0.0001" in ln for ln in lines) == 2
