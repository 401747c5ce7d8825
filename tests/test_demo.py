"""``her2ray demo``: the pass/fail rule, the held-out split, and one reduced end-to-end run.

The full-size demo (48 slides, 5 folds) is measured by hand, not in the suite; the reduced run here checks
that every stage runs from the one command, that outputs and the summary land under --out, and that the
random-weights notice is printed and written.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from her2ray.demo import RANDOM_WEIGHTS_NOTICE, check_auc, holdout_split


def test_check_auc_says_what_held():
    ok, msg = check_auc({"auc_macro_ovr": 0.95}, 0.9)
    assert ok and "PASSED" in msg and "0.950" in msg
    ok, msg = check_auc({"auc_macro_ovr": 0.71}, 0.9)
    assert not ok and "FAILED" in msg and "0.710 < 0.90" in msg
    for metrics in (None, {}, {"auc_macro_ovr": math.nan}):
        ok, msg = check_auc(metrics, 0.9)
        assert not ok and "not available" in msg


def test_holdout_split_is_stratified_and_patient_disjoint():
    rows = [{"slide_id": f"s{i}", "patient_id": f"p{i // 2}", "her2_score": ["0", "1+", "2+", "3+"][(i // 2) % 4]}
            for i in range(48)]
    train, test = holdout_split(rows, 0.25, seed=0)
    assert len(train) + len(test) == 48 and 8 <= len(test) <= 16
    assert set(Counter(r["her2_score"] for r in test)) == {"0", "1+", "2+", "3+"}
    assert not {r["patient_id"] for r in train} & {r["patient_id"] for r in test}
    assert holdout_split(rows, 0.25, seed=0) == (train, test)  # deterministic


@pytest.mark.slow
def test_demo_reduced_run(tmp_path, capsys):
    from her2ray.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--n-slides", "16", "--folds", "2", "--max-epochs", "3",
               "--patience", "3", "--slide-px", "1024", "--min-auc", "0"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-4000:]
    assert RANDOM_WEIGHTS_NOTICE in printed
    for stage in ("synth", "embed", "train", "score", "evaluate", "heatmap"):
        assert f"] {stage} done in" in printed, stage
    assert "Report:" in printed and "ROC plot:" in printed and "Heatmap:" in printed
    assert "CHECK PASSED" in printed

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["weights"] == RANDOM_WEIGHTS_NOTICE and summary["weights_are_real"] is False
    assert summary["n_slides"] == 16 and summary["n_test"] >= 4
    assert "auc_macro_ovr" in summary["test_metrics"]
    for key in ("report", "roc_png", "heatmap_png", "predictions", "metrics"):
        assert summary["outputs"][key], key
    assert (out / "readme" / "roc.png").exists() and (out / "readme" / "heatmap.png").exists()
    report = (out / "demo_report.md").read_text()
    assert RANDOM_WEIGHTS_NOTICE in report
    assert RANDOM_WEIGHTS_NOTICE in (out / "evaluation" / "report.md").read_text()
