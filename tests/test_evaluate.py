"""``her2ray evaluate`` end to end (local files and the loopback S3 server) and its boundary validation."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from her2ray import storage
from her2ray.cli import main
from her2ray.errors import ManifestError
from her2ray.labels import HER2_SCORES, PROB_COLUMNS
from her2ray.reports.evaluate import evaluate_predictions, load_labels, load_predictions
from her2ray.reports.metrics import classification_metrics

N_BOOT = "100"  # keeps each end-to-end run to about a second; the default is 1000


def make_cohort(n=48, seed=0):
    """Predictions rows and manifest rows: two slides per patient, three centers, a few unmatched slides."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    preds, manifest = [], []
    for i in range(n):
        sid = f"S{i:03d}"
        preds.append({"slide_id": sid, **{c: float(p[i, k]) for k, c in enumerate(PROB_COLUMNS)},
                      "pred_score": HER2_SCORES[int(p[i].argmax())]})
        manifest.append({"slide_id": sid, "path": f"/slides/{sid}.svs", "patient_id": f"P{i // 2:03d}",
                         "her2_score": HER2_SCORES[y[i]], "center": "ABC"[i % 3]})
    preds.append({"slide_id": "EXTRA-1", **{c: 0.25 for c in PROB_COLUMNS}, "pred_score": "0"})
    manifest.append({"slide_id": "NOPRED-1", "path": "/slides/x.svs", "patient_id": "P999", "her2_score": "2+",
                     "center": "A"})
    manifest.append({"slide_id": "UNLAB-1", "path": "/slides/u.svs", "patient_id": "P998", "her2_score": "",
                     "center": "A"})
    return preds, manifest, y, p


def to_csv(rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_inputs(base, preds, manifest, pred_format="parquet"):
    pred_url = storage.join(base, f"predictions.{pred_format}")
    if pred_format == "parquet":
        storage.write_parquet_atomic(pa.Table.from_pylist(preds), pred_url)
    else:
        storage.write_text_atomic(pred_url, to_csv(preds))
    man_url = storage.join(base, "manifest.csv")
    storage.write_text_atomic(man_url, to_csv(manifest))
    return pred_url, man_url


def check_png(data: bytes):
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.width > 300 and img.height > 200
    assert np.asarray(img.convert("L")).std() > 5


def test_evaluate_cli_local(tmp_path, capsys):
    preds, manifest, y, p = make_cohort()
    pred_url, man_url = write_inputs(str(tmp_path / "in"), preds, manifest)
    out = tmp_path / "eval"
    assert main(["evaluate", "--predictions", pred_url, "--manifest", man_url, "--out", str(out),
                 "--n-boot", N_BOOT, "--seed", "3"]) == 0
    assert "evaluated 48 slides" in capsys.readouterr().out
    result = json.loads((out / "metrics.json").read_text())
    ref = classification_metrics(y, p)
    for key in ("accuracy", "auc_macro_ovr", "f1_micro", "f1_macro", "qwk", "confusion_matrix", "n",
                "class_counts", "auc_per_class"):
        assert result[key] == pytest.approx(ref[key]) if not isinstance(ref[key], (list, dict)) \
            else result[key] == ref[key] or result[key] == pytest.approx(ref[key]), key
    assert result["endpoints"]["her2_0_vs_low"]["auc"] == pytest.approx(ref["endpoints"]["her2_0_vs_low"]["auc"])
    ci = result["bootstrap_ci"]["accuracy"]
    assert ci["lo"] <= ci["estimate"] <= ci["hi"] and ci["n_boot"] == 100
    assert result["bootstrap"]["n_patients"] == 24 and result["bootstrap"]["seed"] == 3
    assert 0 <= result["calibration"]["ece"] <= 1 and len(result["calibration"]["bins"]) == 10
    assert set(result["per_center"]) == {"A", "B", "C"}
    assert result["per_center"]["A"]["n"] == 16
    assert "bootstrap_ci" in result["per_center"]["B"]
    match = result["matching"]
    assert match["predictions_without_label"] == ["EXTRA-1"]
    assert match["labels_without_prediction"] == ["NOPRED-1"]
    assert match["unlabelled_in_manifest"] == ["UNLAB-1"]
    assert match["n_evaluated"] == 48
    assert result["provenance"]["inputs"]["predictions"]["sha256"]
    report = (out / "report.md").read_text()
    for needle in ("EXTRA-1", "NOPRED-1", "UNLAB-1", "## Per center", "![", "roc.png", "per_center.png",
                   "## Calibration", "## Provenance", "95% CI"):
        assert needle in report, needle
    for name in ("roc.png", "confusion.png", "calibration.png", "per_center.png"):
        check_png((out / name).read_bytes())


def test_evaluate_cli_s3(s3_bucket):
    preds, manifest, y, p = make_cohort(n=30, seed=1)
    for row in manifest:  # no centers: no per-center section or PNG
        row.pop("center")
    pred_url, man_url = write_inputs(f"{s3_bucket}/inputs", preds, manifest, pred_format="csv")
    out = f"{s3_bucket}/eval/run1"
    assert main(["evaluate", "--predictions", pred_url, "--manifest", man_url, "--out", out,
                 "--n-boot", "50"]) == 0
    result = json.loads(storage.read_text(f"{out}/metrics.json"))
    assert result["n"] == 30 and "per_center" not in result
    assert result["accuracy"] == pytest.approx(classification_metrics(y, p)["accuracy"])
    for name in ("roc.png", "confusion.png", "calibration.png"):
        check_png(storage.read_bytes(f"{out}/{name}"))
    assert not storage.exists(f"{out}/per_center.png")
    assert "# HER2 scoring evaluation" in storage.read_text(f"{out}/report.md")


def test_missing_class_in_labels_is_a_note(tmp_path):
    preds, manifest, _, _ = make_cohort(n=24, seed=2)
    for row in manifest:
        if row["her2_score"] == "3+":
            row["her2_score"] = "2+"
    pred_url, man_url = write_inputs(str(tmp_path), preds, manifest)
    result = evaluate_predictions(pred_url, man_url, str(tmp_path / "out"), n_boot=20,
                                  make_plots=False)
    assert result["auc_per_class"]["3+"] is None
    assert any("absent" in n for n in result["notes"])
    assert result["bootstrap_ci"]["auc_per_class.3+"]["lo"] is None


@pytest.mark.parametrize("mutate,column,row,fragment", [
    (lambda p, m: [r.pop("prob_her2_2plus") for r in p], "prob_her2_2plus", None, "missing required column"),
    (lambda p, m: p[4].update(prob_her2_0=p[4]["prob_her2_0"] + 0.5), "prob_her2_0", 5, "sum to"),
    (lambda p, m: p[2].update(prob_her2_3plus="abc"), "prob_her2_3plus", 3, "must be a number"),
    (lambda p, m: p[6].update(prob_her2_1plus=""), "prob_her2_1plus", 7, "empty probability"),
    (lambda p, m: p[1].update(slide_id="S000"), "slide_id", 2, "duplicate"),
])
def test_bad_predictions_name_file_row_column(tmp_path, mutate, column, row, fragment):
    preds, manifest, _, _ = make_cohort(n=12)
    mutate(preds, manifest)
    pred_url, man_url = write_inputs(str(tmp_path), preds, manifest, pred_format="csv")
    with pytest.raises(ManifestError) as err:
        load_predictions(pred_url)
    assert err.value.file == pred_url and row == err.value.row and column in err.value.column
    assert fragment in str(err.value)


@pytest.mark.parametrize("mutate,column,row,fragment", [
    (lambda m: m[3].update(her2_score="4+"), "her2_score", 4, "not a HER2 IHC score"),
    (lambda m: m[0].update(her2_score="positive"), "her2_score", 1, "not a HER2 IHC score"),
    (lambda m: [r.pop("her2_score") for r in m], "her2_score", None, "missing required column"),
    (lambda m: m[5].update(slide_id="../evil"), "slide_id", 6, "unsafe slide id"),
])
def test_bad_labels_name_file_row_column(tmp_path, mutate, column, row, fragment):
    preds, manifest, _, _ = make_cohort(n=12)
    mutate(manifest)
    _, man_url = write_inputs(str(tmp_path), preds, manifest)
    with pytest.raises(ManifestError) as err:
        load_labels(man_url)
    assert err.value.file == man_url and err.value.row == row and err.value.column == column
    assert fragment in str(err.value)


def test_cli_reports_bad_input_cleanly(tmp_path, capsys):
    preds, manifest, _, _ = make_cohort(n=12)
    manifest[3]["her2_score"] = "5"
    pred_url, man_url = write_inputs(str(tmp_path), preds, manifest)
    assert main(["evaluate", "--predictions", pred_url, "--manifest", man_url, "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "manifest.csv" in err and "row 4" in err and "'her2_score'" in err
    # no slide in common: a clear error, not an empty report
    other = [dict(r, slide_id="X" + r["slide_id"]) for r in preds]
    pred_url2, man_url2 = write_inputs(str(tmp_path / "b"), other, make_cohort(n=12)[1])
    assert main(["evaluate", "--predictions", pred_url2, "--manifest", man_url2, "--out",
                 str(tmp_path / "o2")]) == 2
    assert "no slide of the predictions has a label" in capsys.readouterr().err


def test_failed_slides_without_probabilities_are_reported(tmp_path):
    preds, manifest, _, _ = make_cohort(n=12)
    for c in PROB_COLUMNS:
        preds[0][c] = None
    pred_url, man_url = write_inputs(str(tmp_path), preds, manifest)
    result = evaluate_predictions(pred_url, man_url, str(tmp_path / "out"), n_boot=10,
                                  make_plots=False)
    assert result["matching"]["unscored_predictions"] == ["S000"]
    assert "S000" in result["matching"]["labels_without_prediction"]
    assert result["n"] == 11
    assert "S000" in (tmp_path / "out" / "report.md").read_text()
