"""Tiling: tissue mask, level choice, grid, bulk reading (against direct OpenSlide reads) and the
``her2ray tile`` command, on the real SVS and on synthetic pyramidal slides."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pyarrow.parquet as pq
import pytest
from PIL import Image

from her2ray.cli import main
from her2ray.errors import ConfigError, MissingMPPError, NoTissueError
from her2ray.slides import open_slide
from her2ray.synth import write_pyramidal_tiff, write_synthetic_slide
from her2ray.tiling import (TilingConfig, choose_level, iter_tile_batches, plan_tiles, read_tiles,
                            slide_tissue_mask, tile_tissue_fractions, tissue_mask)


@pytest.fixture(scope="module")
def slide_025(tmp_path_factory):
    """Synthetic 2048 x 1536 px slide at 0.25 um/px (level 1 = 0.5 um/px)."""
    return write_synthetic_slide(tmp_path_factory.mktemp("t") / "s025.tiff", 2048, 1536, mpp=0.25, seed=11)


@pytest.fixture(scope="module")
def cmu_grid(cmu_small_region):
    with open_slide(cmu_small_region) as s:
        return plan_tiles(s, TilingConfig())


# ---- mask ---------------------------------------------------------------------------------------------

def test_tissue_mask_on_real_slide(cmu_small_region):
    with open_slide(cmu_small_region) as s:
        mask, mask_mpp = slide_tissue_mask(s, TilingConfig())
    h, w = mask.shape
    assert mask.dtype == bool and max(h, w) == 512
    assert w / h == pytest.approx(2220 / 2967, rel=0.01)
    assert 2.5 < mask_mpp < 3.2
    # H&E strip plus marking dye over about a third of the field (measured: 35%)
    assert 0.25 <= mask.mean() <= 0.38


def test_tissue_mask_pure_function():
    img = np.full((200, 300, 3), 245, np.uint8)
    yy, xx = np.mgrid[0:200, 0:300]
    disk = (yy - 100) ** 2 + (xx - 150) ** 2 < 60**2
    img[disk] = (220, 140, 190)  # pink tissue
    img[5:8, 5:8] = (120, 60, 150)  # a 9 px speck of debris
    mask = tissue_mask(img, closing_px=2, min_area_px=50)
    assert mask[disk].mean() > 0.99 and mask[~disk].mean() < 0.01
    assert not tissue_mask(np.full((50, 50, 3), 250, np.uint8)).any()  # blank stays blank


def test_tile_tissue_fractions_are_exact_areas():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half is tissue; mask pixel = 10 level-0 px
    x = np.array([0, 25, 40, 60])
    y = np.zeros(4, np.int64)
    frac = tile_tissue_fractions(mask, (100, 100), x, y, 20.0)
    assert frac.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])


# ---- level choice -------------------------------------------------------------------------------------

def test_choose_level_rules():
    pyr = (1.0, 2.0, 4.0, 8.0)
    c = choose_level(pyr, 0.25, 0.5, 256)
    assert (c.level, c.level_downsample, c.read_px) == (1, 2.0, 256)
    c = choose_level((1.0,), 0.499, 0.5, 256)  # within tolerance: read as-is
    assert (c.level, c.read_px) == (0, 256)
    c = choose_level((1.0, 4.0, 16.0), 0.25, 0.5, 256)  # level 1 (1.0 um/px) too coarse: resize level 0
    assert (c.level, c.read_px) == (0, 512)
    c = choose_level(pyr, 0.25, 0.75, 256)  # finest level not finer than needed, then downsize
    assert (c.level, c.read_px) == (1, 384)
    c = choose_level((1.0,), 1.0, 0.5, 256)  # coarser than the target everywhere: upsample
    assert (c.level, c.read_px) == (0, 128)


def test_snap_read_px_rounds_40x_reads_to_exact_power_of_two_sizes():
    """Real 40x scans are 0.2465-0.2527 um/px: by default they read 519-507 px per 0.5 um/px tile; with snap
    every one within the 2 % tolerance reads exactly 512 (the DCT-scalable size); others are unchanged."""
    pyr = (1.0, 4.0, 16.0)
    for mpp, plain in ((0.252, 508), (0.2527, 507), (0.2465, 519), (0.25, 512)):
        assert choose_level(pyr, mpp, 0.5, 256).read_px == plain
        c = choose_level(pyr, mpp, 0.5, 256, snap=True)
        assert (c.level, c.read_px, c.tile_size_level0_px()) == (0, 512, 512.0), mpp
    assert choose_level(pyr, 0.22, 0.5, 256, snap=True).read_px == 582      # 0.44 / 0.5: 12 % off -> no snap
    assert choose_level((1.0,), 0.1245, 1.0, 256, snap=True).read_px == 2048  # 8x
    c = choose_level(pyr, 0.1245, 1.0, 256, snap=True)                      # the coarsest fine-enough level first
    assert (c.level, c.read_px) == (1, 512)
    assert choose_level((1.0, 2.0), 0.252, 0.5, 256, snap=True).read_px == 256   # a matching level wins
    assert choose_level((1.0,), 0.499, 1.0, 256, snap=True).read_px == 512  # CMU at 1.0 um/px: 513 -> 512


def test_level_choice_on_slide_reads_level_1(slide_025):
    with open_slide(slide_025) as s:
        grid = plan_tiles(s, TilingConfig(target_mpp=0.5, tile_px=256))
        assert grid.level == 1 and grid.level_downsample == 2.0
        assert grid.read_px == 256 and grid.tile_size_level0_px == 512.0
        assert grid.slide_mpp == pytest.approx(0.25) and grid.level_mpp == pytest.approx(0.5)
        assert len(grid) > 0 and grid.n_grid_cells == 4 * 3
        tiles = read_tiles(s, grid)
    direct = openslide.OpenSlide(str(slide_025))
    for k in range(len(grid)):
        ref = np.asarray(direct.read_region((int(grid.x[k]), int(grid.y[k])), 1, (256, 256)))[..., :3]
        assert np.array_equal(tiles[k], ref)


def test_resize_path_matches_box_resize(slide_025):
    with open_slide(slide_025) as s:
        grid = plan_tiles(s, TilingConfig(target_mpp=0.75, tile_px=128, min_tissue=0.0))
        assert grid.level == 1 and grid.read_px == 192
        tiles = read_tiles(s, grid, [0, 3])
        region = s.read_region(int(grid.x[3]), int(grid.y[3]), 1, 192, 192)
    ref = np.asarray(Image.fromarray(region).resize((128, 128), Image.Resampling.BOX))
    assert tiles.shape == (2, 128, 128, 3) and np.array_equal(tiles[1], ref)


def test_mpp_override_changes_the_grid(cmu_small_region):
    with open_slide(cmu_small_region, mpp_override=0.25) as s:
        grid = plan_tiles(s, TilingConfig())
    assert grid.slide_mpp == 0.25 and grid.read_px == 512 and grid.tile_size_level0_px == 512
    assert grid.n_grid_cells == (2220 // 512) * (2967 // 512)


def test_missing_mpp_and_no_tissue(tmp_path):
    nompp = write_synthetic_slide(tmp_path / "nompp.tiff", 768, 768, seed=1, write_mpp=False)
    with open_slide(nompp) as s, pytest.raises(MissingMPPError, match="nompp.tiff"):
        plan_tiles(s)
    blank = write_pyramidal_tiff(str(tmp_path / "blank.tiff"), 1024, 1024,
                                 lambda c, r: np.full((256, 256, 3), 243, np.uint8), mpp=0.5)
    with open_slide(blank) as s, pytest.raises(NoTissueError, match="blank.tiff"):
        plan_tiles(s)


def test_config_validation():
    assert TilingConfig().to_dict()["tile_px"] == 256
    with pytest.raises(ConfigError, match="tile_size"):
        TilingConfig.from_mapping({"tile_size": 256})
    with pytest.raises(ConfigError, match="min_tissue"):
        TilingConfig.from_mapping({"min_tissue": 1.5})


# ---- grid and reading on the real slide -----------------------------------------------------------------

def test_grid_on_real_slide(cmu_grid):
    g = cmu_grid
    assert g.n_grid_cells == 88 and 20 <= len(g) <= 60
    assert (g.level, g.read_px, g.tile_size_level0_px) == (0, 256, 256.0)
    assert g.x.dtype == np.int64 and g.y.dtype == np.int64 and g.tissue_fraction.dtype == np.float32
    assert (g.tissue_fraction >= 0.25).all() and (g.tissue_fraction <= 1).all()
    assert (g.x % 256 == 0).all() and (g.y % 256 == 0).all()
    order = np.lexsort((g.x, g.y))
    assert np.array_equal(order, np.arange(len(g)))  # row-major: y, then x


@pytest.mark.parametrize("target_mpp", [0.499, 0.5])
def test_tiles_equal_direct_openslide_reads(cmu_small_region, target_mpp):
    with open_slide(cmu_small_region) as s:
        grid = plan_tiles(s, TilingConfig(target_mpp=target_mpp))
        tiles = read_tiles(s, grid)
    assert tiles.shape == (len(grid), 256, 256, 3) and tiles.dtype == np.uint8
    direct = openslide.OpenSlide(str(cmu_small_region))
    for k in range(len(grid)):
        ref = np.asarray(direct.read_region((int(grid.x[k]), int(grid.y[k])), 0, (256, 256)))[..., :3]
        assert np.array_equal(tiles[k], ref), f"tile {k} at ({grid.x[k]}, {grid.y[k]})"


def test_subsets_and_batches_match_full_read(cmu_small_region, cmu_grid):
    with open_slide(cmu_small_region) as s:
        full = read_tiles(s, cmu_grid, num_workers=1)
        picked = read_tiles(s, cmu_grid, [7, 2, 2, 0])
        assert np.array_equal(picked, full[[7, 2, 2, 0]])
        assert read_tiles(s, cmu_grid, []).shape == (0, 256, 256, 3)
        seen = []
        for idx, batch in iter_tile_batches(s, cmu_grid, batch_size=8):
            assert np.array_equal(batch, full[idx])
            seen.extend(idx.tolist())
        assert seen == list(range(len(cmu_grid)))


# ---- CLI ------------------------------------------------------------------------------------------------

def test_cli_tile_writes_grid_and_mask(cmu_small_region, cmu_grid, tmp_path, capsys):
    out, png = tmp_path / "grid.parquet", tmp_path / "mask.png"
    assert main(["tile", str(cmu_small_region), "--out", str(out), "--mask-png", str(png)]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["x", "y", "tissue_fraction", "level", "mpp"]
    assert table.column("x").to_pylist() == cmu_grid.x.tolist()
    assert set(table.column("mpp").to_pylist()) == {0.5}
    grid_meta = json.loads(table.schema.metadata[b"her2ray_grid"])
    assert grid_meta["level"] == 0 and grid_meta["slide_mpp"] == pytest.approx(0.499)
    assert json.loads(table.schema.metadata[b"her2ray"])["tiling"]["tile_px"] == 256
    qc = np.asarray(Image.open(png))                    # a QC picture: thumbnail + outline + tile grid
    assert qc.ndim == 3 and qc.shape[2] == 3 and qc.shape[0] > qc.shape[1] > 200
    assert (np.all(qc == (0, 200, 70), axis=-1)).sum() > 100          # tissue outline
    assert (np.all(qc == (255, 215, 0), axis=-1)).sum() > 100         # kept tile squares
    printed = capsys.readouterr().out
    assert f"{len(cmu_grid)} of 88 tiles" in printed


def test_cli_tile_options_and_errors(slide_025, tmp_path, capsys):
    out = tmp_path / "g.parquet"
    args = ["tile", str(slide_025), "--out", str(out), "--mpp", "1.0", "--tile-px", "128", "--min-tissue", "0.5"]
    assert main(args) == 0
    meta = json.loads(pq.read_table(out).schema.metadata[b"her2ray_grid"])
    assert (meta["level"], meta["tile_px"], meta["target_mpp"]) == (2, 128, 1.0)
    nompp = write_synthetic_slide(tmp_path / "nompp.tiff", 768, 768, seed=2, write_mpp=False)
    assert main(["tile", str(nompp), "--out", str(out)]) == 2
    assert "--mpp-override" in capsys.readouterr().err
    assert main(["tile", str(nompp), "--out", str(out), "--mpp-override", "0.5"]) == 0


def test_stopping_batches_early_leaves_no_read_in_flight(cmu_small_region, cmu_grid):
    with open_slide(cmu_small_region) as s:
        batches = iter_tile_batches(s, cmu_grid, batch_size=4)
        idx, batch = next(batches)
        assert idx.tolist() == [0, 1, 2, 3] and batch.shape == (4, 256, 256, 3)
        batches.close()  # joins the prefetch thread before the slide is closed
    assert s.closed


def test_feature_files_written_before_snap_read_px_existed_still_resume():
    from her2ray.features.embed import meta_resume_key, resume_key
    from her2ray.features.schema import FeatureFileMeta

    enc = {"name": "plip", "weights": "x"}
    old_tiling = {k: v for k, v in TilingConfig().to_dict().items() if k != "snap_read_px"}
    meta = FeatureFileMeta(slide_id="s", encoder=enc, tile_px=256, target_mpp=0.5, slide_mpp=0.25, level=0,
                           tile_size_level0_px=512.0, extra={"tiling": old_tiling})
    assert meta_resume_key(meta) == resume_key(enc, TilingConfig())
    assert meta_resume_key(meta) != resume_key(enc, TilingConfig(snap_read_px=True))
