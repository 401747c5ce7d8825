"""Embedding engine + Ray Data pipeline, end to end on real components.

Real slides (the Aperio SVS and synthetic pyramidal TIFFs read by OpenSlide), a real local Ray, a real S3
protocol server (moto) and real encoders. Most tests use a tiny open_clip ViT saved to a folder (the I/O
and bookkeeping are what is under test); one goes through the real PLIP architecture.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from her2ray import storage
from her2ray.encoders import load_encoder
from her2ray.features import catalog
from her2ray.features.embed import EmbedConfig, embed_slide, load_engine_encoder, resume_key
from her2ray.features.pipeline import plan_actors
from her2ray.features.schema import feature_url, read_slide_features
from her2ray.slides import open_slide
from her2ray.tiling import TilingConfig, plan_tiles, read_tiles


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, cmu_small_region) -> dict[str, str]:
    """Slide files: two synthetic pyramids, a blank one, a TIFF without MPP, a corrupt file, the real SVS."""
    import tifffile

    from her2ray.synth import write_synthetic_slide

    d = tmp_path_factory.mktemp("slides")
    paths = {
        "syn1": write_synthetic_slide(str(d / "syn1.tiff"), 2048, 1536, seed=1),
        "syn2": write_synthetic_slide(str(d / "syn2.tiff"), 1536, 1280, seed=2, label=3),
        "blank": write_synthetic_slide(str(d / "blank.tiff"), 1024, 1024, seed=3, tissue_share=0.0),
        "cmu": str(cmu_small_region),
    }
    img = np.full((1024, 1024, 3), 235, np.uint8)
    img[128:896, 128:896] = (170, 70, 150)
    tifffile.imwrite(d / "nompp.tif", img, tile=(256, 256), photometric="rgb", compression="jpeg")
    paths["nompp"] = str(d / "nompp.tif")
    (d / "corrupt.svs").write_bytes(b"II*\x00" + os.urandom(4000))
    paths["corrupt"] = str(d / "corrupt.svs")
    paths["missing"] = str(d / "not-there.svs")
    return paths


def _manifest(path, rows) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def _rows(c: dict[str, str]) -> list[dict]:
    return [
        {"slide_id": "syn1", "path": c["syn1"], "mpp": "", "patient_id": "P1", "her2_score": "0"},
        {"slide_id": "syn2", "path": c["syn2"], "mpp": "0.5", "patient_id": "P2", "her2_score": "3+"},
        {"slide_id": "cmu", "path": c["cmu"], "mpp": "", "patient_id": "P3", "her2_score": "1+"},
        # given as a 0.25 um/px "40x" scan: 512 px reads -> the pipelined engine's DCT-scaled route on Ray
        {"slide_id": "nompp_fixed", "path": c["nompp"], "mpp": "0.25", "patient_id": "P4", "her2_score": "2+"},
        {"slide_id": "nompp", "path": c["nompp"], "mpp": "", "patient_id": "P4", "her2_score": "2+"},
        {"slide_id": "blank", "path": c["blank"], "mpp": "", "patient_id": "P5", "her2_score": "0"},
        {"slide_id": "corrupt", "path": c["corrupt"], "mpp": "", "patient_id": "P6", "her2_score": "0"},
        {"slide_id": "missing", "path": c["missing"], "mpp": "", "patient_id": "P7", "her2_score": "0"},
    ]


EXPECTED_FAIL = {"nompp": "MissingMPPError", "blank": "NoTissueError", "corrupt": "SlideReadError",
                 "missing": "SlideNotFoundError"}


def _tile_count(path, mpp=None, cfg=None) -> int:
    """The tiling stage's own tile count for a slide."""
    with open_slide(path, mpp_override=mpp) as reader:
        return len(plan_tiles(reader, cfg or TilingConfig(), keep_mask=False))


def cli_main(argv) -> int:
    """``her2ray`` main restricted to the embed stage (same parsing and error contract as her2ray.cli.main),
    so these tests do not depend on the other stages' modules."""
    import argparse

    from her2ray.cli.embed import add_parser
    from her2ray.errors import Her2RayError

    parser = argparse.ArgumentParser(prog="her2ray")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Her2RayError as exc:
        print(f"her2ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _embed(*argv) -> int:
    return cli_main(["embed", *map(str, argv), "--num-cpus-per-actor", "2"])


# --------------------------------------------------------------------------------------------------
# Engine (no Ray)

def test_engine_plip_features_equal_encoder_on_directly_read_tiles(tmp_path, cohort):
    """Real PLIP architecture (random weights): stored features == encoder(tile read on its own)."""
    cfg = EmbedConfig(batch_size=4)
    enc = load_engine_encoder(cfg)
    assert enc.identity["architecture"] == "ViT-B-32-quickgelu" and enc.random_weights
    row = {"slide_id": "small", "path": cohort["nompp"], "mpp": 0.5}
    status = embed_slide(row, enc, cfg, str(tmp_path))
    assert status["status"] == "ok" and status["error"] is None
    sf = read_slide_features(feature_url(str(tmp_path), "small"))
    with open_slide(cohort["nompp"], mpp_override=0.5) as reader:
        grid = plan_tiles(reader, cfg.tiling, keep_mask=False)
        pick = np.array([0, len(grid) - 1])
        direct = enc.embed_tiles(read_tiles(reader, grid, pick))
    assert status["n_tiles"] == len(grid) == len(sf.x) > 4 and sf.features.shape == (len(grid), 512)
    np.testing.assert_array_equal(sf.coords, grid.coords)
    np.testing.assert_allclose(sf.features[pick], direct, rtol=2e-3, atol=2e-3)   # float16 storage
    assert sf.meta.encoder["random_weights"] is True and sf.meta.encoder["dim"] == 512
    assert sf.meta.tile_px == 256 and sf.meta.slide_mpp == 0.5 and sf.meta.extra["mpp_source"] == "override"
    assert sf.meta.extra["tiling"] == cfg.tiling.to_dict()


def test_engine_turns_every_bad_slide_into_a_failed_status(tmp_path, cohort, tiny_encoder):
    cfg = EmbedConfig(encoder="open_clip", weights=tiny_encoder)
    enc = load_engine_encoder(cfg)
    for sid, kind in EXPECTED_FAIL.items():
        st = embed_slide({"slide_id": sid, "path": cohort[sid]}, enc, cfg, str(tmp_path))
        assert st["status"] == "failed" and st["error"].startswith(kind), st
        assert cohort[sid] in st["error"] or sid == "missing" and "not-there" in st["error"]
        assert not os.path.exists(feature_url(str(tmp_path), sid))
    ok = embed_slide({"slide_id": "nompp", "path": cohort["nompp"], "mpp": 0.5}, enc, cfg, str(tmp_path))
    assert ok["status"] == "ok" and ok["mpp"] == 0.5 and ok["n_tiles"] == _tile_count(cohort["nompp"], 0.5)
    assert ok["read_wait_s"] >= 0 and ok["encode_s"] > 0


# --------------------------------------------------------------------------------------------------
# Ray pipeline, local store

def test_cli_end_to_end_local_store_and_resume(ray_session, tmp_path, cohort, tiny_encoder, capsys):
    rows = _rows(cohort)
    out = tmp_path / "store"
    full = _manifest(tmp_path / "manifest.csv", rows)
    subset = _manifest(tmp_path / "subset.csv", rows[:2])
    enc = ["--encoder", "open_clip", "--weights", tiny_encoder]

    # 1) the full cohort: bad slides fail with their reasons, the rest is embedded, exit status 1
    #    (the pipelined engine, the default on GPU clusters; "auto" picks the slide engine on this CPU box)
    assert _embed("--manifest", full, "--out", out, *enc, "--engine", "pipelined") == 1
    captured = capsys.readouterr()
    assert "4 of 8 slide(s) failed" in captured.err and "FAILED corrupt" in captured.out

    cat = pq.read_table(out / "slides.parquet").to_pandas()
    assert list(cat.slide_id) == [r["slide_id"] for r in rows]                # manifest order
    status = dict(zip(cat.slide_id, cat.status))
    assert status == {"syn1": "ok", "syn2": "ok", "cmu": "ok", "nompp_fixed": "ok",
                      **{k: "failed" for k in EXPECTED_FAIL}}
    for sid, kind in EXPECTED_FAIL.items():
        assert cat.set_index("slide_id").loc[sid, "error"].startswith(kind)
    assert {"patient_id", "her2_score", "manifest_mpp"} <= set(cat.columns)   # carried manifest columns
    expected = {"syn1": _tile_count(cohort["syn1"]), "syn2": _tile_count(cohort["syn2"], 0.5),
                "cmu": _tile_count(cohort["cmu"]), "nompp_fixed": _tile_count(cohort["nompp"], 0.25)}
    assert dict(zip(cat.slide_id, cat.n_tiles)) == {**expected, **{k: 0 for k in EXPECTED_FAIL}}
    assert cat.set_index("slide_id").loc["cmu", "mpp"] == pytest.approx(0.499, abs=1e-3)

    # the store reads as one dataset; every file has the contract schema and its slide's tile count
    df = pd.read_parquet(out / "features")
    assert df.groupby("slide_id").size().to_dict() == expected
    ds = pads.dataset(str(out / "features"), format="parquet")
    assert ds.count_rows() == sum(expected.values())
    ftype = ds.schema.field("feature").type
    assert ftype.list_size == 16 and str(ftype.value_type) == "halffloat"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["encoder"]["weights_format"] == "open_clip"
    assert run["summary"]["counts"] == {"ok": 4, "skipped": 0, "failed": 4}
    stages = run["summary"]["stages"]                       # the default (pipelined) engine's statistics
    assert stages["engine"] == "pipelined" and stages["tiles"] == sum(expected.values())
    assert 0 <= stages["device_idle_share"] <= 1 and stages["steady_tiles_per_s"] is not None
    routes = {sid: read_slide_features(feature_url(str(out), sid)).meta.extra["transport"] for sid in expected}
    assert routes["nompp_fixed"]["downscale"] == "dct-1/2" and routes["nompp_fixed"]["payload_px"] == 256
    assert {routes[s]["downscale"] for s in ("syn1", "syn2", "cmu")} == {"none"}

    # features of a tile == encoder applied to the tile read directly
    sf = read_slide_features(feature_url(str(out), "syn2"))
    encoder = load_encoder("open_clip", tiny_encoder, device="cpu")
    with open_slide(cohort["syn2"], mpp_override=0.5) as reader:
        grid = plan_tiles(reader, TilingConfig(), keep_mask=False)
        direct = encoder.embed_tiles(read_tiles(reader, grid, [0, len(grid) - 1]))
    np.testing.assert_allclose(sf.features[[0, len(grid) - 1]], direct, rtol=2e-3, atol=2e-3)

    # 2) interrupted run: one output lost, a stray temp file left behind -> rerun redoes exactly that slide,
    #    keeps (skips) the complete ones and retries the failed ones
    os.remove(out / "features" / "cmu.parquet")
    stray = out / "features" / ".syn1.parquet.abc123.tmp"
    stray.write_bytes(b"partial")
    os.utime(stray, (time.time() - 3600, time.time() - 3600))      # left by a run killed an hour ago
    in_flight = out / "features" / ".syn2.parquet.def456.tmp"       # fresh: could be a live writer's: kept
    in_flight.write_bytes(b"partial")
    assert _embed("--manifest", full, "--out", out, *enc, "--no-progress", "--engine", "pipelined") == 1
    cat = pq.read_table(out / "slides.parquet").to_pandas().set_index("slide_id")
    assert (cat.status == "ok").sum() == 1 and cat.loc["cmu", "status"] == "ok"
    assert (cat.status == "skipped").sum() == 3 and (cat.status == "failed").sum() == 4
    assert cat.loc[list(expected), "n_tiles"].to_dict() == expected                  # skipped rows keep counts
    assert not stray.exists() and in_flight.exists()
    in_flight.unlink()
    assert pd.read_parquet(out / "features").groupby("slide_id").size().to_dict() == expected  # no duplicates

    # 3) other tiling settings make old files stale: recomputed, not reused (--overwrite: plan_resume unit test);
    #    this time with the reference engine (one slide per actor call), same contract
    assert _embed("--manifest", subset, "--out", out, *enc, "--min-tissue", "0.5", "--no-progress",
                  "--engine", "slide") == 0
    cat = pq.read_table(out / "slides.parquet").to_pylist()
    assert [(r["slide_id"], r["status"]) for r in cat[:2]] == [("syn1", "ok"), ("syn2", "ok")]
    assert [r["slide_id"] for r in cat[2:]] == [r["slide_id"] for r in rows[2:]]      # other slides kept
    meta = read_slide_features(feature_url(str(out), "syn1")).meta
    assert meta.extra["tiling"]["min_tissue"] == 0.5 and "engine" not in meta.extra
    assert json.loads((out / "run.json").read_text())["summary"]["stages"]["engine"] == "slide"


# --------------------------------------------------------------------------------------------------
# Ray pipeline, S3 store

def test_s3_slides_manifest_and_store(ray_session, s3_bucket, tmp_path, cohort, tiny_encoder):
    fs, _ = storage.filesystem_for(s3_bucket)
    for name in ("syn1", "corrupt"):
        fs.put_file(cohort[name], f"{s3_bucket[5:]}/slides/{os.path.basename(cohort[name])}")
    rows = [{"slide_id": "syn1", "path": f"{s3_bucket}/slides/syn1.tiff"},
            {"slide_id": "corrupt", "path": f"{s3_bucket}/slides/corrupt.svs"},
            {"slide_id": "gone", "path": f"{s3_bucket}/slides/gone.svs"}]
    manifest = f"{s3_bucket}/manifest.csv"
    storage.write_text_atomic(manifest, pd.DataFrame(rows).to_csv(index=False))
    out = f"{s3_bucket}/store"
    enc = ["--encoder", "open_clip", "--weights", tiny_encoder, "--no-progress"]
    # compressed JPEG tiles through Ray (the default on GPU clusters), decoded in the encoder actor
    assert _embed("--manifest", manifest, "--out", out, *enc, "--qc-dir", f"{s3_bucket}/qc",
                  "--engine", "pipelined", "--tile-transport", "jpeg") == 1
    cat = storage.read_parquet(f"{out}/slides.parquet").to_pandas().set_index("slide_id")
    assert cat.status.to_dict() == {"syn1": "ok", "corrupt": "failed", "gone": "failed"}
    assert cat.loc["gone", "error"].startswith("SlideNotFoundError") and "(preflight)" in cat.loc["gone", "error"]
    # QC: a picture of the embedded slide (written by its actor) and one contact sheet with all three slides
    from PIL import Image

    qc = np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{s3_bucket}/qc/syn1.png"))))
    assert (np.all(qc == (255, 215, 0), axis=-1)).sum() > 50                     # kept tile squares
    sheet = Image.open(io.BytesIO(storage.read_bytes(f"{s3_bucket}/qc/contact_sheet_001.png")))
    assert sheet.width > 3 * 256 and not storage.exists(f"{s3_bucket}/qc/contact_sheet_002.png")
    assert cat.loc["corrupt", "error"].startswith("SlideReadError")
    assert cat.loc["syn1", "n_tiles"] == _tile_count(cohort["syn1"])
    df = pd.read_parquet(f"{out}/features")
    assert len(df) == cat.loc["syn1", "n_tiles"] and set(df.slide_id) == {"syn1"}
    transport = read_slide_features(feature_url(out, "syn1")).meta.extra["transport"]
    assert transport["kind"] == "jpeg" and transport["jpeg_layout"]["k"] == 1
    assert json.loads(storage.read_text(f"{out}/run.json"))["status"] == "finished"
    # rerun: the S3 file is reused, failures are retried
    assert _embed("--manifest", manifest, "--out", out, *enc) == 1
    cat = storage.read_parquet(f"{out}/slides.parquet").to_pandas().set_index("slide_id")
    assert cat.loc["syn1", "status"] == "skipped" and cat.loc["syn1", "n_tiles"] == len(df)


# --------------------------------------------------------------------------------------------------
# Boundaries and small units

def test_bad_manifest_fails_before_any_work(tmp_path, capsys):
    manifest = _manifest(tmp_path / "m.csv", [{"slide_id": "a", "path": "/x.svs"}, {"slide_id": "b", "path": ""}])
    out = tmp_path / "store"
    assert cli_main(["embed", "--manifest", manifest, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "'path'" in err and str(manifest) in err
    assert not out.exists()
    bad_cfg = tmp_path / "c.yaml"
    bad_cfg.write_text("embed:\n  tiling: {tile_pixels: 3}\n")
    good = _manifest(tmp_path / "g.csv", [{"slide_id": "a", "path": "/x.svs"}])
    assert cli_main(["embed", "--manifest", good, "--out", str(out), "--config", str(bad_cfg)]) == 2
    assert "tile_pixels" in capsys.readouterr().err and not out.exists()


def test_config_yaml_and_flags(tmp_path):
    import argparse

    from her2ray.cli.embed import add_parser, build_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("embed:\n  encoder: open_clip:ViT-B-16\n  batch_size: 8\n  num_actors: 3\n"
                        "  tiling: {min_tissue: 0.4, tile_px: 224}\n")
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["embed"].parse_args(["--manifest", "m", "--out", "o", "--config", str(cfg_file),
                                            "--mpp", "1.0", "--tile-px", "256", "--num-gpus-per-actor", "0.5"])
    cfg, ray_opts = build_config(args)
    assert cfg.encoder == "open_clip:ViT-B-16" and cfg.batch_size == 8
    assert cfg.tiling.target_mpp == 1.0 and cfg.tiling.tile_px == 256 and cfg.tiling.min_tissue == 0.4
    assert ray_opts == {"num_actors": 3, "num_gpus_per_actor": 0.5}
    from her2ray.cli import STAGES

    assert STAGES.index("embed") == STAGES.index("tile") + 1


def test_plan_actors_gpu_and_cpu_placement():
    gpu = plan_actors({"CPU": 64, "GPU": 4}, n_todo=100)
    assert gpu["num_actors"] == 4 and gpu["num_gpus"] == 1.0 and "num_cpus" not in gpu
    assert plan_actors({"CPU": 64, "GPU": 4}, 100, num_gpus_per_actor=0.5)["num_actors"] == 8
    assert plan_actors({"CPU": 64, "GPU": 4}, n_todo=2)["num_actors"] == 2
    cpu = plan_actors({"CPU": 16}, n_todo=100)
    assert cpu == {"num_cpus": 4.0, "device": "cpu", "torch_threads": 4, "num_actors": 4}
    assert plan_actors({"CPU": 2}, n_todo=5)["num_actors"] == 1


def test_resume_rules_and_catalog_columns(tmp_path, cohort, tiny_encoder):
    cfg = EmbedConfig(encoder="open_clip", weights=tiny_encoder)
    enc = load_engine_encoder(cfg)
    store = str(tmp_path)
    row = {"slide_id": "syn1", "path": cohort["syn1"]}
    assert embed_slide(row, enc, cfg, store)["status"] == "ok"
    key = resume_key(enc.settings_identity(), cfg.tiling)
    plan = catalog.plan_resume([row], store, key)
    assert plan.todo == [] and plan.skipped[0]["status"] == "skipped" and plan.skipped[0]["n_tiles"] > 0
    assert catalog.plan_resume([row], store, key, overwrite=True).todo == [row]
    other = resume_key(enc.settings_identity(), TilingConfig(min_tissue=0.9))
    assert catalog.plan_resume([row], store, other).stale == ["syn1"]
    assert catalog.plan_resume([{**row, "mpp": 0.25}], store, key).stale == ["syn1"]   # MPP override changed
    assert catalog.plan_resume([{**row, "mpp": 0.5}], store, key).todo == []
    shutil.copy(feature_url(store, "syn1"), feature_url(store, "syn9"))                   # wrong slide inside
    assert catalog.plan_resume([{"slide_id": "syn9", "path": "x"}], store, key).stale == ["syn9"]

    table = catalog.build_catalog(
        [{"slide_id": "syn1", "path": "p", "mpp": 0.5, "status": "x", "center": "A"}],
        [plan.skipped[0]])
    assert table.column_names[:10] == list(catalog.STATUS_COLUMNS)
    assert {"manifest_mpp", "manifest_status", "center"} <= set(table.column_names)
    assert catalog.is_usable("skipped") and catalog.is_usable("ok") and not catalog.is_usable("failed")


def test_stain_normalisation_is_applied_recorded_and_never_mixed_on_resume(tmp_path, cohort, tiny_encoder):
    plain_cfg = EmbedConfig(encoder="open_clip", weights=tiny_encoder)
    stain_cfg = EmbedConfig(encoder="open_clip", weights=tiny_encoder, stain_normalization="macenko")
    enc = load_engine_encoder(plain_cfg)
    row = {"slide_id": "syn2", "path": cohort["syn2"]}
    plain_store, stain_store = str(tmp_path / "plain"), str(tmp_path / "stain")
    assert embed_slide(row, enc, plain_cfg, plain_store)["status"] == "ok"
    assert embed_slide(row, enc, stain_cfg, stain_store)["status"] == "ok"
    plain = read_slide_features(feature_url(plain_store, "syn2"))
    stained = read_slide_features(feature_url(stain_store, "syn2"))
    normalizer = stain_cfg.stain_normalizer()

    assert plain.meta.stain_normalization is None
    assert stained.meta.stain_normalization == normalizer.name and normalizer.name.startswith("macenko:")
    np.testing.assert_array_equal(plain.coords, stained.coords)           # same tiles ...
    assert np.abs(plain.features - stained.features).max() > 1e-2         # ... other pixels fed to the encoder
    with open_slide(cohort["syn2"]) as reader:                            # = encoder(normalise(tile))
        grid = plan_tiles(reader, stain_cfg.tiling)
        tiles = read_tiles(reader, grid, np.arange(4))
    np.testing.assert_allclose(stained.features[:4], enc.embed_tiles(normalizer(tiles)), atol=2e-2, rtol=1e-2)

    settings = enc.settings_identity()
    stain_key = resume_key(settings, stain_cfg.tiling, normalizer.name)
    assert catalog.plan_resume([row], stain_store, stain_key).todo == []
    assert catalog.plan_resume([row], plain_store, stain_key).stale == ["syn2"]      # never mixed silently
    assert catalog.plan_resume([row], stain_store, resume_key(settings, plain_cfg.tiling)).stale == ["syn2"]
    with pytest.raises(Exception, match="unknown stain normalisation"):
        EmbedConfig(stain_normalization="vahadane")
