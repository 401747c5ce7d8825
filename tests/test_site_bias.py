"""Site-bias diagnostic: ~0.5 AUC without a site difference, ~1.0 with a planted one; CLI report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from her2ray import storage
from her2ray.cli import main
from her2ray.cohorts import site_bias_auc
from her2ray.errors import FeatureStoreError, Her2RayError
from her2ray.features.schema import FeatureFileMeta, build_feature_table, feature_url

DIM = 32


def _write_store(store: str, centers: dict[str, int], site_shift: float = 0.0, seed: int = 0,
                 label_shift: float = 0.0, labels_by_center: dict[str, list[int]] | None = None,
                 tiles: int = 8, stain: dict[str, str] | None = None) -> list[dict]:
    """Feature store of random tile features; ``site_shift`` adds a per-center offset to every tile,
    ``label_shift`` a per-HER2-class offset. Returns manifest rows."""
    rng = np.random.default_rng(seed)
    center_dirs = {c: rng.normal(size=DIM) for c in centers}
    class_dirs = rng.normal(size=(4, DIM))
    rows = []
    for c, n in centers.items():
        for i in range(n):
            sid = f"{c}-{i:03d}"
            label = labels_by_center[c][i % len(labels_by_center[c])] if labels_by_center else int(rng.integers(0, 4))
            feats = rng.normal(size=(tiles, DIM)) + site_shift * center_dirs[c] + label_shift * class_dirs[label]
            meta = FeatureFileMeta(slide_id=sid, encoder={"name": "test", "architecture": "none",
                                                          "weights_sha256": "0", "dim": DIM},
                                   tile_px=224, target_mpp=0.5, slide_mpp=0.5, level=0, tile_size_level0_px=224.0,
                                   stain_normalization=(stain or {}).get(c))
            xy = np.arange(tiles, dtype=np.int64) * 224
            table = build_feature_table(sid, xy, xy, np.ones(tiles, np.float32), feats, meta)
            storage.write_parquet_atomic(table, feature_url(store, sid))
            rows.append({"slide_id": sid, "path": f"/x/{sid}.svs", "center": c,
                         "her2_score": ["0", "1+", "2+", "3+"][label]})
    return rows


def test_no_site_difference_gives_chance_auc(tmp_path):
    rows = _write_store(str(tmp_path / "s"), {"A": 40, "B": 40, "C": 40})
    report = site_bias_auc(str(tmp_path / "s"), rows, seed=0, folds=5)
    assert 0.35 <= report["auc"] <= 0.65, report
    assert report["warning"] is False and report["n_slides"] == 120 and report["n_centers"] == 3
    assert set(report["auc_per_center"]) == {"A", "B", "C"}


def test_planted_site_difference_is_flagged(tmp_path):
    rows = _write_store(str(tmp_path / "s"), {"A": 30, "B": 30, "C": 30}, site_shift=0.5)
    report = site_bias_auc(str(tmp_path / "s"), rows, seed=0, folds=5)
    assert report["auc"] > 0.95 and report["warning"] is True and "center instead of HER2" in report["message"]
    again = site_bias_auc(str(tmp_path / "s"), rows, seed=0, folds=5)
    assert again["auc"] == report["auc"]          # seeded: reproducible


def test_label_imbalance_explains_site_signal(tmp_path):
    # centers differ only in class balance; features depend only on HER2 class
    rows = _write_store(str(tmp_path / "s"), {"A": 40, "B": 40}, label_shift=0.6,
                        labels_by_center={"A": [0, 0, 0, 1, 3], "B": [3, 3, 3, 2, 0]})
    report = site_bias_auc(str(tmp_path / "s"), rows, seed=0)
    assert report["auc"] > 0.75 and report["auc_label_adjusted"] < 0.65, report
    assert report["class_counts_per_center"]["A"]["0"] == 24


def test_missing_features_and_small_centers(tmp_path):
    rows = _write_store(str(tmp_path / "s"), {"A": 6, "B": 6, "C": 1})
    rows.append({"slide_id": "A-999", "path": "/x", "center": "A", "her2_score": "0"})   # never featurised
    report = site_bias_auc(str(tmp_path / "s"), rows, folds=5)
    assert report["missing_features"] == 1 and report["dropped_centers"] == ["C"] and report["n_centers"] == 2
    with pytest.raises(Her2RayError, match="at least 2 centers"):
        site_bias_auc(str(tmp_path / "s"), [r for r in rows if r["center"] == "A"])


def test_mixed_feature_settings_are_refused(tmp_path):
    rows = _write_store(str(tmp_path / "s"), {"A": 4, "B": 4}, stain={"B": "macenko:0123456789ab"})
    with pytest.raises(FeatureStoreError, match="2 different settings"):
        site_bias_auc(str(tmp_path / "s"), rows)


def test_cli_site_bias_writes_report(tmp_path):
    rows = _write_store(str(tmp_path / "s"), {"A": 12, "B": 12}, site_shift=1.0)
    manifest = tmp_path / "m.parquet"
    storage.write_parquet_atomic(pa.Table.from_pylist(rows), str(manifest))
    out = tmp_path / "r" / "site_bias.json"
    args = ["cohort", "site-bias", "--features", str(tmp_path / "s"), "--manifest", str(manifest), "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["warning"] is True and report["folds"] == 5
    assert main(args + ["--strict"]) == 1
