"""Synthetic slides: OpenSlide-readable pyramids with MPP, streaming writer, planted class signal,
cohorts with balanced manifests, remote output, and the ``her2ray synth`` command."""

from __future__ import annotations

import fsspec
import numpy as np
import openslide
import pytest

from her2ray.cli import main
from her2ray.labels import HER2_SCORES
from her2ray.manifest import load_manifest
from her2ray.slides import SlideCache, open_slide
from her2ray.synth import pyramid, synth_cohort, write_synthetic_slide
from her2ray.tiling import plan_tiles, read_tiles


def _brown_share(tiles: np.ndarray) -> np.ndarray:
    """Share of dark-brown / blue-black pixels per tile (the planted pattern)."""
    t = tiles.astype(np.int16)
    return ((t[..., 0] < 140) & (t[..., 2] < 100)).mean(axis=(1, 2))


def test_slide_opens_in_openslide_with_pyramid_and_mpp(tmp_path):
    path = write_synthetic_slide(tmp_path / "s.tiff", 2000, 1500, mpp=0.25, seed=1)
    s = openslide.OpenSlide(path)
    assert openslide.OpenSlide.detect_format(path) == "generic-tiff"
    assert s.dimensions == (2000, 1500)
    assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0, 8.0), rel=0.01)  # halved until one tile holds it
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert s.properties["openslide.level[0].tile-width"] == "256"
    assert s.properties["tiff.ImageDescription"].startswith("her2ray synthetic slide")
    # each level is the 2x box average of the one above (up to JPEG loss)
    l0 = np.asarray(s.read_region((0, 0), 0, (2000, 1500)))[..., :3].astype(np.float32)
    l1 = np.asarray(s.read_region((0, 0), 1, (1000, 750)))[..., :3].astype(np.float32)
    assert np.abs(l0.reshape(750, 2, 1000, 2, 3).mean(axis=(1, 3)) - l1).mean() < 4.0


def test_deterministic_and_seed_dependent(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.tiff", 768, 768, seed=5, label=2)
    b = write_synthetic_slide(tmp_path / "b.tiff", 768, 768, seed=5, label=2)
    c = write_synthetic_slide(tmp_path / "c.tiff", 768, 768, seed=6, label=2)
    read = lambda p: np.asarray(openslide.OpenSlide(p).read_region((0, 0), 0, (768, 768)))  # noqa: E731
    assert np.array_equal(read(a), read(b))
    assert not np.array_equal(read(a), read(c))


def test_streaming_writer_memmap_path_gives_same_pixels(tmp_path, monkeypatch):
    """Levels too big for RAM go through a disk memmap; force that path and compare."""
    ram = write_synthetic_slide(tmp_path / "ram.tiff", 1100, 900, seed=2)
    monkeypatch.setattr(pyramid, "IN_MEMORY_LEVEL_BYTES", 1)
    disk = write_synthetic_slide(tmp_path / "disk.tiff", 1100, 900, seed=2)
    sa, sb = openslide.OpenSlide(ram), openslide.OpenSlide(disk)
    assert sa.level_dimensions == sb.level_dimensions
    for k, dims in enumerate(sa.level_dimensions):
        assert np.array_equal(np.asarray(sa.read_region((0, 0), k, dims)), np.asarray(sb.read_region((0, 0), k, dims)))
    assert not list(tmp_path.glob(".her2ray-synth-*"))  # temporary files cleaned up


def test_planted_signal_grows_with_label(tmp_path):
    shares, means = [], []
    for label in range(4):
        path = write_synthetic_slide(tmp_path / f"l{label}.tiff", 1536, 1536, label=label, seed=40 + label)
        with open_slide(path) as s:
            grid = plan_tiles(s)
            tiles = read_tiles(s, grid)
        assert 12 <= len(grid) <= 36
        shares.append(float((_brown_share(tiles) > 0.1).mean()))
        means.append(tiles.reshape(-1, 3).mean(axis=0))
    assert shares[0] == 0.0
    assert shares[1] > 0.15 and shares[3] > 0.55  # tissue-edge tiles are seldom marked
    assert shares == sorted(shares)
    # mean tile colour alone separates the classes (the pattern is large and colour-distinct)
    red = [m[0] for m in means]
    assert red == sorted(red, reverse=True)


def test_no_label_plants_nothing_and_strength_zero(tmp_path):
    for kwargs in ({"label": None}, {"label": 3, "signal_strength": 0.0}):
        path = write_synthetic_slide(tmp_path / "n.tiff", 1024, 1024, seed=9, **kwargs)
        with open_slide(path) as s:
            tiles = read_tiles(s, plan_tiles(s))
        assert (_brown_share(tiles) < 0.02).all()


def test_synth_cohort_is_balanced(tmp_path):
    rows = synth_cohort(tmp_path / "cohort", 8, n_centers=2, seed=3, width_px=768, height_px=768)
    manifest = load_manifest(str(tmp_path / "cohort" / "manifest.csv"))
    assert [r["slide_id"] for r in manifest] == [r["slide_id"] for r in rows]
    assert sorted(r["her2_score"] for r in manifest) == sorted(HER2_SCORES * 2)
    for score in HER2_SCORES:  # every class in both centres: centre is no shortcut to the label
        assert {r["center"] for r in manifest if r["her2_score"] == score} == {"C0", "C1"}
    assert all(r["mpp"] is None for r in manifest)
    assert len({r["patient_id"] for r in manifest}) == 8
    for r in manifest:
        with open_slide(r["path"]) as s:
            assert s.dimensions == (768, 768) and s.mpp == 0.5


def test_synth_cohort_centres_and_patients(tmp_path):
    rows = synth_cohort(tmp_path / "c", 4, centers=["A", "B"], seed=1, width_px=512, height_px=512,
                        slides_per_patient=2, workers=2)
    assert {r["center"] for r in rows} <= {"A", "B"}
    assert rows[0]["patient_id"] == rows[1]["patient_id"] and rows[0]["her2_score"] == rows[1]["her2_score"]
    assert rows[2]["patient_id"] != rows[0]["patient_id"]


def test_write_to_s3_and_read_back(s3_bucket, tmp_path):
    url = f"{s3_bucket}/synth/one.tiff"
    assert write_synthetic_slide(url, 768, 512, seed=4, label=1) == url
    assert fsspec.filesystem("s3").exists(url)
    with open_slide(url, cache=SlideCache(tmp_path / "cache", max_bytes=10**8)) as s:
        assert s.dimensions == (768, 512) and s.mpp == 0.5


def test_cli_synth_cohort_single_and_errors(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["synth", "--out", str(out), "--n-slides", "4", "--width-px", "512", "--seed", "2"]) == 0
    assert len(load_manifest(str(out / "manifest.csv"))) == 4
    assert "wrote 4 slides" in capsys.readouterr().out
    one = tmp_path / "one.tiff"
    assert main(["synth", "--single", "--out", str(one), "--label", "3+", "--width-px", "600",
                 "--height-px", "400", "--mpp", "0.25"]) == 0
    s = openslide.OpenSlide(str(one))
    assert s.dimensions == (600, 400) and float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert main(["synth", "--out", str(out)]) == 2
    assert main(["synth", "--single", "--out", str(one), "--label", "4+"]) == 2
    assert "--label" in capsys.readouterr().err


def test_bigtiff_variant_opens(tmp_path):
    """Slides over 2 GiB raw (e.g. 50k x 50k) are written as BigTIFF; OpenSlide must read that too."""
    painter = lambda c, r: np.full((256, 256, 3), (200, 120, 170), np.uint8)  # noqa: E731
    path = pyramid.write_pyramidal_tiff(str(tmp_path / "big.tiff"), 700, 600, painter, mpp=0.5, bigtiff=True)
    with open(path, "rb") as fh:
        assert fh.read(4) == b"II+\x00"  # BigTIFF magic
    s = openslide.OpenSlide(path)
    assert s.level_count == 3 and float(s.properties["openslide.mpp-x"]) == 0.5
    assert np.abs(np.asarray(s.read_region((10, 10), 1, (8, 8)))[..., :3].astype(int) - (200, 120, 170)).max() < 8
