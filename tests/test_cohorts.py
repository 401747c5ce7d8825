"""Multi-center merge: column mapping, label spellings, ISH status, duplicates, conflicts, summary, CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from her2ray.cli import main
from her2ray.cohorts import MergeConfig, merge_cohorts, write_summary
from her2ray.cohorts.duplicates import content_groups, stat_files
from her2ray.errors import ConfigError, ManifestError
from her2ray.manifest import read_table


def _slide_file(path: Path, seed: int, size: int | None = None) -> str:
    """A stand-in slide file: random bytes (merge only stats/hashes files, it never decodes them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path.write_bytes(rng.integers(0, 256, size or int(rng.integers(2000, 4000)), dtype=np.uint8).tobytes())
    return str(path)


def _csv(path: Path, header: list[str], rows: list[list]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def three_centers(tmp_path):
    """Center A (CSV, 'HER2 2+' spellings, relative paths), B (Parquet, numeric scores, FISH column),
    C (CSV, free-text labels needing a label_map)."""
    a_dir, b_dir, c_dir = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    for i in range(3):
        _slide_file(a_dir / "slides" / f"a{i}.svs", seed=i)
        _slide_file(b_dir / f"b{i}.tiff", seed=10 + i)
        _slide_file(c_dir / f"c{i}.ndpi", seed=20 + i)
    man_a = _csv(a_dir / "manifest.csv", ["Slide", "File", "HER2", "Patient", "Block"],
                 [["A-001", "slides/a0.svs", "HER2 0", "PA1", "x1"],
                  ["A-002", "slides/a1.svs", "IHC 2+", "PA2", "x2"],
                  ["A-003", "slides/a2.svs", "3+", "PA3", ""]])
    man_b = str(b_dir / "manifest.parquet")
    pq.write_table(pa.table({
        "slide_name": ["B1", "B2", "B3"], "image_path": [str(b_dir / f"b{i}.tiff") for i in range(3)],
        "ihc": ["2", "2", "1"], "pid": ["PB1", "PB2", "PB3"], "FISH": ["Amplified", "not amplified", None],
    }), man_b)
    man_c = _csv(c_dir / "list.csv", ["id", "wsi", "score", "case"],
                 [["C1", str(c_dir / "c0.ndpi"), "weak", "PC1"],
                  ["C2", str(c_dir / "c1.ndpi"), "negative", "PC2"],
                  ["C3", str(c_dir / "c2.ndpi"), "2+", "PC3"]])
    cfg = {"centers": [
        {"name": "siteA", "manifest": man_a,
         "columns": {"Slide": "slide_id", "File": "path", "HER2": "her2_score", "Patient": "patient_id"}},
        {"name": "siteB", "manifest": man_b,
         "columns": {"slide_name": "slide_id", "image_path": "path", "ihc": "her2_score", "pid": "patient_id"},
         "ish": {"column": "FISH", "positive": ["amplified"], "negative": ["not amplified"]}},
        {"name": "siteC", "manifest": man_c,
         "columns": {"id": "slide_id", "wsi": "path", "score": "her2_score", "case": "patient_id"},
         "label_map": {"weak": "1+", "negative": 0}},
    ]}
    return tmp_path, cfg


def test_merge_three_centers_unified_manifest(three_centers):
    root, cfg = three_centers
    result = merge_cohorts(MergeConfig.from_mapping(cfg))
    rows = {r["slide_id"]: r for r in result.rows}
    assert list(rows) == ["A-001", "A-002", "A-003", "B1", "B2", "B3", "C1", "C2", "C3"]
    assert [rows[s]["her2_score"] for s in rows] == ["0", "2+", "3+", "2+", "2+", "1+", "1+", "0", "2+"]
    assert {rows[s]["center"] for s in ("B1", "B2", "B3")} == {"siteB"}
    # relative paths resolve against the manifest's folder
    assert rows["A-002"]["path"] == str(root / "A" / "slides" / "a1.svs")
    assert rows["A-002"]["patient_id"] == "PA2" and rows["A-001"]["Block"] == "x1" and rows["A-003"]["Block"] is None
    # ISH-derived status and HER2-low
    assert (rows["B1"]["her2_status"], rows["B1"]["her2_low"]) == ("positive", False)
    assert (rows["B2"]["her2_status"], rows["B2"]["her2_low"]) == ("negative", True)
    assert (rows["A-003"]["her2_status"], rows["A-001"]["her2_status"]) == ("positive", "negative")
    assert rows["C3"]["her2_status"] is None          # 2+ without ISH stays unknown
    assert rows["C1"]["her2_low"] is True and rows["C2"]["her2_low"] is False
    assert rows["B1"]["ish"] == "Amplified"
    assert all(r["file_size"] > 0 and r["source_file"] for r in result.rows)
    assert result.duplicates == [] and result.patient_overlap == []
    table = result.to_table()
    assert table.num_rows == 9 and table.schema.field("her2_low").type == pa.bool_()


def test_prefix_and_unknown_config_key(three_centers):
    _, cfg = three_centers
    result = merge_cohorts(MergeConfig.from_mapping({**cfg, "prefix_slide_ids": True}))
    assert result.rows[0]["slide_id"] == "siteA_A-001" and result.rows[0]["source_slide_id"] == "A-001"
    with pytest.raises(ConfigError, match="colums"):
        MergeConfig.from_mapping({"centers": [{"name": "x", "manifest": "m.csv", "colums": {}}]})
    with pytest.raises(ConfigError, match="label_map"):
        MergeConfig.from_mapping({"centers": [{"name": "x", "manifest": "m.csv", "label_map": {"a": "4+"}}]})


def test_unlabelled_external_cohort_and_no_file_checks(three_centers):
    root, cfg = three_centers
    _csv(root / "C" / "list.csv", ["id", "wsi", "case"], [["C1", "/nowhere/c0.ndpi", "PC1"],
                                                          ["C2", "/nowhere/c0.ndpi", "PC2"]])  # same path twice
    del cfg["centers"][2]["columns"]["score"]
    with pytest.raises(ManifestError, match="no column maps to 'her2_score'"):
        merge_cohorts(MergeConfig.from_mapping(cfg))
    result = merge_cohorts(MergeConfig.from_mapping({**cfg, "require_labels": False, "check_files": False}))
    c_rows = [r for r in result.rows if r["center"] == "siteC"]
    assert [r["slide_id"] for r in c_rows] == ["C1"] and c_rows[0]["her2_score"] is None
    assert result.duplicates[0]["reason"] == "same path" and result.duplicates[0]["dropped_slide_id"] == "C2"


def test_bad_label_names_center_file_row_column(three_centers):
    root, cfg = three_centers
    man = _csv(root / "C" / "list.csv", ["id", "wsi", "score", "case"],
               [["C1", str(root / "C" / "c0.ndpi"), "weak", "PC1"],
                ["C2", str(root / "C" / "c1.ndpi"), "equivocal", "PC2"]])
    with pytest.raises(ManifestError) as err:
        merge_cohorts(MergeConfig.from_mapping(cfg))
    msg = str(err.value)
    assert "siteC" in msg and man in msg and "row 2" in msg and "'score'" in msg and "equivocal" in msg


def test_ish_ratio_threshold(three_centers):
    _, cfg = three_centers
    man_b = cfg["centers"][1]["manifest"]
    t = pq.read_table(man_b).to_pydict()
    t["FISH"] = ["2.4", "1.3", "not amplified"]
    t["ihc"] = ["2+", "2+", "2+"]
    pq.write_table(pa.table(t), man_b)
    cfg["centers"][1]["ish"]["ratio_threshold"] = 2.0
    rows = {r["slide_id"]: r for r in merge_cohorts(MergeConfig.from_mapping(cfg)).rows}
    assert [rows[s]["her2_status"] for s in ("B1", "B2", "B3")] == ["positive", "negative", "negative"]
    assert [rows[s]["her2_low"] for s in ("B1", "B2", "B3")] == [False, True, True]


def test_bad_ish_value_is_an_error(three_centers):
    root, cfg = three_centers
    man_b = cfg["centers"][1]["manifest"]
    t = pq.read_table(man_b).to_pydict()
    t["FISH"][2] = "amplifed"   # typo
    pq.write_table(pa.table(t), man_b)
    with pytest.raises(ManifestError, match=r"row 3.*'FISH'.*amplifed"):
        merge_cohorts(MergeConfig.from_mapping(cfg))


def test_same_file_two_names_two_centers_kept_once(three_centers):
    root, cfg = three_centers
    # siteC submits a byte-identical copy of siteA's a1.svs (IHC 2+) under another name, same label
    shutil.copy(root / "A" / "slides" / "a1.svs", root / "C" / "copy_of_a1.ndpi")
    _csv(root / "C" / "list.csv", ["id", "wsi", "score", "case"],
         [["C1", str(root / "C" / "c0.ndpi"), "weak", "PC1"],
          ["C9", str(root / "C" / "copy_of_a1.ndpi"), "2", "PC9"]])
    result = merge_cohorts(MergeConfig.from_mapping(cfg))
    ids = [r["slide_id"] for r in result.rows]
    assert "A-002" in ids and "C9" not in ids
    (dup,) = result.duplicates
    assert dup["reason"] == "same file content"
    assert (dup["kept_center"], dup["kept_row"], dup["dropped_center"], dup["dropped_row"]) == ("siteA", 2, "siteC", 2)
    assert any("duplicate" in w for w in result.warnings)


def test_same_file_conflicting_labels_names_both_rows(three_centers):
    root, cfg = three_centers
    shutil.copy(root / "A" / "slides" / "a1.svs", root / "C" / "copy_of_a1.ndpi")
    man_c = _csv(root / "C" / "list.csv", ["id", "wsi", "score", "case"],
                 [["C1", str(root / "C" / "c0.ndpi"), "weak", "PC1"],
                  ["C9", str(root / "C" / "copy_of_a1.ndpi"), "3+", "PC9"]])
    with pytest.raises(ManifestError) as err:
        merge_cohorts(MergeConfig.from_mapping(cfg))
    msg = str(err.value)
    assert "different labels" in msg
    assert "center siteA" in msg and cfg["centers"][0]["manifest"] in msg and "row 2" in msg and "HER2 2+" in msg
    assert "center siteC" in msg and man_c in msg and "HER2 3+" in msg


def test_same_slide_id_conflicting_labels_and_id_collision(three_centers):
    root, cfg = three_centers
    _csv(root / "C" / "list.csv", ["id", "wsi", "score", "case"],
         [["A-001", str(root / "C" / "c0.ndpi"), "weak", "PC1"]])   # siteA's A-001 is IHC 0
    with pytest.raises(ManifestError, match=r"same slide id 'A-001' with different labels.*siteA.*row 1.*siteC.*row 1"):
        merge_cohorts(MergeConfig.from_mapping(cfg))
    _csv(root / "C" / "list.csv", ["id", "wsi", "score", "case"],
         [["A-001", str(root / "C" / "c0.ndpi"), "0", "PC1"]])       # same label, different file
    with pytest.raises(ManifestError, match="two different files.*prefix"):
        merge_cohorts(MergeConfig.from_mapping(cfg))
    cfg["centers"][2]["slide_id_prefix"] = "C_"
    ids = [r["slide_id"] for r in merge_cohorts(MergeConfig.from_mapping(cfg)).rows]
    assert "A-001" in ids and "C_A-001" in ids


def test_same_patient_under_two_centers_is_reported(three_centers):
    root, cfg = three_centers
    _csv(root / "C" / "list.csv", ["id", "wsi", "score", "case"],
         [["C1", str(root / "C" / "c0.ndpi"), "weak", "PA2"]])        # PA2 is a siteA patient
    result = merge_cohorts(MergeConfig.from_mapping(cfg))
    (ov,) = result.patient_overlap
    assert ov["patient_id"] == "PA2" and ov["centers"] == "siteA;siteC" and ov["slides"] == "A-002;C1"
    assert any("patient" in w for w in result.warnings)


def test_missing_files_policy(three_centers):
    root, cfg = three_centers
    os.remove(root / "B" / "b1.tiff")
    with pytest.raises(ManifestError, match=r"not found.*b1.tiff.*siteB.*row 2"):
        merge_cohorts(MergeConfig.from_mapping(cfg))
    assert len(merge_cohorts(MergeConfig.from_mapping({**cfg, "missing_files": "warn"})).rows) == 9
    assert "B2" not in [r["slide_id"] for r in merge_cohorts(
        MergeConfig.from_mapping({**cfg, "missing_files": "drop"})).rows]


def test_content_groups_hash_only_same_size_candidates(tmp_path):
    a = _slide_file(tmp_path / "a.bin", 1, size=5000)
    b = _slide_file(tmp_path / "b.bin", 2, size=5000)       # same size, different bytes
    c = str(tmp_path / "c.bin")
    shutil.copy(a, c)                                        # same bytes
    d = _slide_file(tmp_path / "d.bin", 3, size=7000)       # unique size: never read
    infos = stat_files([a, b, c, d])
    groups = content_groups(infos)
    assert groups[a] == groups[c] != groups[b] and groups[d] not in (groups[a], groups[b])
    assert infos[d].sha256 is None and infos[a].sha256 and infos[b].sha256


def test_merge_from_s3_with_etag_duplicates(s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = s3_bucket
    data = {f"slides/s{i}.svs": np.random.default_rng(i).integers(0, 256, 3000 + i, dtype=np.uint8).tobytes()
            for i in range(3)}
    data["other/dup_of_s0.svs"] = data["slides/s0.svs"]
    for key, blob in data.items():
        fs.pipe(f"{bucket}/{key}", blob)
    man1 = tmp_path / "m1.csv"
    _csv(man1, ["Slide", "File", "HER2"], [["S0", "slides/s0.svs", "1+"], ["S1", "slides/s1.svs", "HER2 3+"]])
    fs.put(str(man1), f"{bucket}/center1/manifest.csv")
    man2 = tmp_path / "m2.csv"
    _csv(man2, ["name", "url", "ihc"], [["T0", f"{bucket}/other/dup_of_s0.svs", "1"],
                                        ["T2", f"{bucket}/slides/s2.svs", "0"]])
    fs.put(str(man2), f"{bucket}/center2/manifest.csv")
    cfg = MergeConfig.from_mapping({"centers": [
        {"name": "c1", "manifest": f"{bucket}/center1/manifest.csv", "path_base": bucket,
         "columns": {"Slide": "slide_id", "File": "path", "HER2": "her2_score"}},
        {"name": "c2", "manifest": f"{bucket}/center2/manifest.csv",
         "columns": {"name": "slide_id", "url": "path", "ihc": "her2_score"}}]})
    result = merge_cohorts(cfg)
    assert [r["slide_id"] for r in result.rows] == ["S0", "S1", "T2"]
    assert result.rows[0]["path"] == f"{bucket}/slides/s0.svs"
    assert result.duplicates[0]["dropped_path"] == f"{bucket}/other/dup_of_s0.svs"
    assert result.rows[0]["content_id"].startswith("md5:")   # settled by the store's ETag, nothing downloaded
    out = f"{bucket}/cohort/unified.parquet"
    from her2ray.cohorts import write_table
    write_table(result.to_table(), out)
    assert read_table(out).column("her2_score").to_pylist() == ["1+", "3+", "0"]


def test_summary_table_and_plot_with_real_slide_and_feature_store(three_centers, cmu_small_region):
    root, cfg = three_centers
    real = root / "A" / "slides" / "real.svs"
    shutil.copy(cmu_small_region, real)
    _csv(root / "A" / "manifest.csv", ["Slide", "File", "HER2", "Patient"],
         [["A-001", "slides/real.svs", "0", "PA1"], ["A-002", "slides/a1.svs", "2+", "PA2"]])
    store = root / "store"
    store.mkdir()
    pq.write_table(pa.table({"slide_id": ["A-001", "B1", "B2"], "status": ["ok", "ok", "failed"],
                             "n_tiles": [120, 80, 0], "mpp": [0.499, 0.25, None]}), store / "slides.parquet")
    result = merge_cohorts(MergeConfig.from_mapping(cfg))
    paths = write_summary(result.rows, str(root / "summary"), features=str(store))
    rows = {r["center"]: r for r in read_table(paths["csv"]).to_pylist()}
    assert set(rows) == {"siteA", "siteB", "siteC", "ALL"}
    a = rows["siteA"]
    assert (a["slides"], a["patients"], a["her2_0"], a["her2_2+"]) == ("2", "2", "1", "1")
    assert a["vendors"] == "aperio: 1" and a["scanners"] == "CPAPERIOCS: 1" and a["mpp_median"] == "0.499"
    assert a["unreadable_slides"] == "1" and a["tiles_median"] == "120"
    assert rows["siteB"]["mpp_median"] == "0.25" and rows["siteB"]["slides_with_features"] == "1"
    assert rows["ALL"]["slides"] == "8"
    assert "| siteA |" in Path(paths["markdown"]).read_text()
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_merge_and_summary(three_centers, tmp_path):
    import yaml

    root, cfg = three_centers
    _csv(root / "C" / "list.csv", ["id", "wsi", "score", "case"],
         [["C1", str(root / "C" / "c0.ndpi"), "weak", "PA2"]])
    conf = root / "merge.yaml"
    conf.write_text(yaml.safe_dump({"cohort": {**cfg, "slide_metadata": False}}))
    out = root / "out" / "unified.csv"
    assert main(["cohort", "merge", "--config", str(conf), "--section", "cohort", "--out", str(out),
                 "--summary-dir", str(root / "out" / "summary")]) == 0
    rows = read_table(str(out)).to_pylist()
    assert len(rows) == 7 and rows[0]["center"] == "siteA" and rows[-1]["her2_score"] == "1+"
    record = json.loads((root / "out" / "unified.merge.json").read_text())
    assert record["stage"] == "cohort-merge" and record["report"]["patient_overlap"][0]["patient_id"] == "PA2"
    for name in ("summary.csv", "summary.md", "summary.png", "patient_overlap.csv"):
        assert (root / "out" / "summary" / name).exists(), name
    assert main(["cohort", "summary", "--manifest", str(out), "--out-dir", str(root / "s2"),
                 "--no-slide-metadata"]) == 0
    assert (root / "s2" / "summary.png").exists()
    conf.write_text(yaml.safe_dump({**cfg, "centres": []}))
    assert main(["cohort", "merge", "--config", str(conf), "--out", str(out)]) == 2   # unknown key: clean error
    assert main(["cohort", "merge", "--config", str(root / "nope.yaml"), "--out", str(out)]) == 2
