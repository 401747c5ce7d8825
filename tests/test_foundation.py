"""Foundation: storage round-trips on local disk and the loopback S3 server, configs, labels, manifests."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from her2ray import storage
from her2ray.config import StageConfig
from her2ray.errors import ConfigError, ManifestError
from her2ray.labels import HER2_SCORES, PROB_COLUMNS, is_her2_low, parse_her2_score
from her2ray.manifest import load_manifest


@pytest.mark.parametrize("value,expected", [
    ("0", 0), ("1+", 1), ("2+", 2), ("3+", 3), ("HER2 1+", 1), ("IHC 2+", 2), ("her2: 3+", 3),
    ("1", 1), (3, 3), (2.0, 2), ("score 2", 2),
])
def test_parse_her2_score_accepts_common_spellings(value, expected):
    assert parse_her2_score(value) == expected


@pytest.mark.parametrize("value", ["4", "0+", "1++", "abc", "", None, True, -1, 1.5, "3-"])
def test_parse_her2_score_rejects_others(value):
    with pytest.raises(ValueError):
        parse_her2_score(value)


def test_label_constants():
    assert HER2_SCORES == ("0", "1+", "2+", "3+")
    assert PROB_COLUMNS[1] == "prob_her2_1plus"
    assert [is_her2_low(i) for i in range(4)] == [False, True, True, False]


class _Cfg(StageConfig):
    tile_px: int = 256
    mpp: float = 0.5


def test_config_rejects_unknown_keys_and_bad_types(tmp_path):
    assert _Cfg.from_mapping({"tile_px": 224}).tile_px == 224
    with pytest.raises(ConfigError, match="tile_pxx"):
        _Cfg.from_mapping({"tile_pxx": 224})
    with pytest.raises(ConfigError, match="mpp"):
        _Cfg.from_mapping({"mpp": "fast"})
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("tile:\n  mpp: 0.25\n")
    assert _Cfg.from_yaml(cfg_file, section="tile").mpp == 0.25


@pytest.mark.parametrize("base_fixture", ["tmp_path", "s3_bucket"])
def test_atomic_parquet_and_listing(base_fixture, request):
    base = str(request.getfixturevalue(base_fixture))
    table = pa.table({"a": [1, 2, 3]}, metadata={b"her2ray": b"{}"})
    url = storage.join(base, "features", "s1.parquet")
    storage.write_parquet_atomic(table, url)
    assert storage.read_parquet(url).column("a").to_pylist() == [1, 2, 3]
    assert storage.read_parquet_metadata(url)[b"her2ray"] == b"{}"
    assert storage.list_files(storage.join(base, "features"), ".parquet") == [url]
    assert storage.exists(url)
    storage.remove(url)
    assert not storage.exists(url)


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    url = str(tmp_path / "x.json")
    storage.write_text_atomic(url, "{}")
    assert os.listdir(tmp_path) == ["x.json"]


def test_manifest_validation_names_file_row_and_column(tmp_path):
    good = tmp_path / "m.csv"
    good.write_text("slide_id,path,mpp,center\na,/x/a.svs,0.25,c1\nb,s3://bkt/b.svs,,c2\n")
    rows = load_manifest(str(good))
    assert rows[0]["mpp"] == 0.25 and rows[1]["mpp"] is None and rows[1]["center"] == "c2"

    cases = {
        "slide_id,path\na,/x\na,/y\n": ("row 2", "slide_id", "duplicate"),
        "slide_id,path\n../evil,/x\n": ("row 1", "slide_id", "unsafe"),
        "slide_id,path\na/b,/x\n": ("row 1", "slide_id", "unsafe"),
        "slide_id,path\na,\n": ("row 1", "path", "empty path"),
        "slide_id,path,mpp\na,/x,abc\n": ("row 1", "mpp", "number"),
        "slide,path\na,/x\n": ("file", "slide_id", "missing required"),
    }
    for i, (text, (where, column, what)) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.csv"
        bad.write_text(text)
        with pytest.raises(ManifestError) as info:
            load_manifest(str(bad))
        msg = str(info.value)
        assert str(bad) in msg and where in msg and column in msg and what in msg, msg


def test_yaml_section_takes_the_stage_section_or_the_whole_file(tmp_path):
    from her2ray.config import yaml_section

    both = tmp_path / "run.yaml"
    both.write_text("embed:\n  batch_size: 8\nscore:\ntrain:\n  folds: 3\n")
    assert yaml_section(both, "embed") == {"batch_size": 8}
    assert yaml_section(both, "score") == {}
    one = tmp_path / "train.yaml"
    one.write_text("folds: 4\nseed: 1\n")
    assert yaml_section(one, "train") == {"folds": 4, "seed": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        yaml_section(bad, "train")
