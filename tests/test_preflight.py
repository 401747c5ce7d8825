"""Preflight: manifest rows checked before Ray starts (local file kinds, S3 objects in bulk on a real S3 server)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from her2ray import preflight, storage
from her2ray.preflight import check_local, check_paths, preflight_rows


def test_local_paths_must_be_readable_regular_files(tmp_path, cmu_small_region, monkeypatch):
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.svs"
    folder.mkdir()
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    assert check_local(str(cmu_small_region)) is None
    assert check_local(str(tmp_path / "nope.svs")) == "file not found"
    assert "FIFO" in check_local(str(fifo))                    # must not block: never opened
    assert "is a directory" in check_local(str(folder))
    assert "device" in check_local("/dev/null")
    assert "empty" in check_local(str(empty))
    # a folder the slide readers recognise as one slide (a DICOM WSI series) passes; any other folder does not
    dicom = Path(__file__).parent / "data" / "cmu1_small_dicom"
    assert check_local(str(dicom)) is None
    monkeypatch.setattr(preflight, "_DIRECTORY_CHECKS", [])
    preflight.register_directory_check(lambda p: p.endswith("folder.svs"))
    assert check_local(str(folder)) is None
    assert "is a directory" in check_local(str(tmp_path))

    rows = [{"slide_id": "ok", "path": f"file://{cmu_small_region}"}, {"slide_id": "pipe", "path": str(fifo)},
            {"slide_id": "gone", "path": str(tmp_path / "gone.svs")}]
    result = preflight_rows(rows)
    assert [r["slide_id"] for r in result.ok] == ["ok"]
    reasons = result.reasons()
    assert reasons["gone"].startswith("SlideNotFoundError: ") and reasons["gone"].endswith("(preflight)")
    assert reasons["pipe"].startswith("SlideReadError: ") and str(fifo) in reasons["pipe"]


def test_s3_objects_checked_in_bulk(s3_bucket):
    fs, _ = storage.filesystem_for(s3_bucket)
    bucket = s3_bucket[len("s3://"):]
    many = [f"{s3_bucket}/many/s{i}.svs" for i in range(preflight.LIST_THRESHOLD + 1)]
    for u in many[:-2]:
        fs.pipe(u[len("s3://"):], b"slide-bytes")
    fs.pipe(f"{bucket}/many/empty.svs", b"")
    fs.pipe(f"{bucket}/few/a.svs", b"slide-bytes")
    fs.pipe(f"{bucket}/few/sub/x.svs", b"slide-bytes")
    urls = many + [f"{s3_bucket}/few/a.svs", f"{s3_bucket}/few/b.svs", f"{s3_bucket}/few/sub",
                   f"{s3_bucket}/many/empty.svs"]
    result = check_paths(urls)
    expected = {u: None for u in many[:-2]}
    expected.update({many[-2]: "object not found", many[-1]: "object not found", urls[-4]: None,
                     urls[-3]: "object not found", urls[-2]: "is a prefix (folder), not an object or a slide folder",
                     urls[-1]: "is empty (0 bytes)"})
    assert result == expected


def test_embed_with_no_usable_slide_stops_in_seconds_without_ray(tmp_path, monkeypatch, capsys):
    """Every row fails preflight: no encoder load, no Ray, a catalog with reasons, exit 1."""
    from her2ray.cli import main
    from her2ray.features import pipeline

    def forbidden(*a, **k):
        raise AssertionError("must not be called when every slide failed preflight")

    monkeypatch.setattr(pipeline, "ensure_ray", forbidden)
    monkeypatch.setattr(pipeline, "load_engine_encoder", forbidden)
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    manifest = tmp_path / "m.csv"
    pd.DataFrame([{"slide_id": "gone", "path": str(tmp_path / "gone.svs")},
                  {"slide_id": "pipe", "path": str(fifo)}]).to_csv(manifest, index=False)
    out = tmp_path / "store"
    t0 = time.perf_counter()
    assert main(["embed", "--manifest", str(manifest), "--out", str(out)]) == 1
    assert time.perf_counter() - t0 < 30
    cat = pq.read_table(out / "slides.parquet").to_pandas().set_index("slide_id")
    assert cat.status.to_dict() == {"gone": "failed", "pipe": "failed"}
    assert "file not found" in cat.loc["gone", "error"] and "FIFO" in cat.loc["pipe", "error"]
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["counts"]["failed"] == 2 and "preflight_s" in run["summary"]["timing"]
    captured = capsys.readouterr()
    assert "FAILED pipe" in captured.out and "2 of 2 slide(s) failed" in captured.err


@pytest.mark.parametrize("typo,expected", [(["embed", "--manifest", "m", "--out", "o", "--weigths", "w"],
                                            "did you mean --weights?"),
                                           (["train", "--featurs", "f"], "did you mean --features?")])
def test_mistyped_option_names_the_closest_option_of_the_subcommand(typo, expected, capsys):
    from her2ray.cli import main

    with pytest.raises(SystemExit) as exc:
        main(typo)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and f"usage: her2ray {typo[0]}" in err
