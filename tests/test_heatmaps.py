"""Heatmaps on the real Aperio slide: panel geometry, the hot region lands where the signal was planted, GeoJSON
squares sit exactly on the tiles, and the CLI renders local and s3:// slides on Ray, listing failures."""

from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from PIL import Image

from her2ray import storage
from her2ray.features.schema import FeatureFileMeta, SlideFeatures
from her2ray.heatmaps.geojson import tiles_feature_collection
from her2ray.heatmaps.render import normalize_scores, prediction_title, render_heatmap, score_grid

CMU_DIMS = (2220, 2967)
TILE = 256.5          # 256 px at 0.5 um/px on a 0.499 um/px slide


def full_grid(dims=CMU_DIMS, tile=TILE):
    cols, rows = int(dims[0] // tile), int(dims[1] // tile)
    c, r = np.meshgrid(np.arange(cols), np.arange(rows))
    return np.rint(c.ravel() * tile).astype(np.int64), np.rint(r.ravel() * tile).astype(np.int64)


def planted_scores(x, y, dims=CMU_DIMS, tile=TILE, seed=0):
    """High in the top-left quadrant (tiles entirely inside it), low elsewhere."""
    rng = np.random.default_rng(seed)
    hot = (x + tile <= dims[0] / 2) & (y + tile <= dims[1] / 2)
    return np.where(hot, 1.0, rng.uniform(0.0, 0.2, len(x))), hot


def test_normalize_and_grid():
    s = normalize_scores(np.array([2.0, 4.0, np.nan, 3.0]))
    np.testing.assert_allclose(s[[0, 1, 3]], [0, 1, 0.5])
    assert np.isnan(s[2])
    np.testing.assert_allclose(normalize_scores(np.array([5.0, 1.0, 3.0]), "rank"), [1, 0, 0.5])
    grid = score_grid(np.array([0, 100]), np.array([0, 0]), np.array([0.3, 0.9]), 100, (200, 100), (50, 100))
    assert grid.shape == (50, 100)
    assert np.all(grid[:, :50] == 0.3) and np.all(grid[:, 50:] == 0.9)
    grid = score_grid(np.array([0]), np.array([0]), np.array([1.0]), 100, (200, 200), (100, 100))
    assert np.isnan(grid[60:, :]).all() and np.isnan(grid[:, 60:]).all() and (grid[:50, :50] == 1).all()


def test_prediction_title():
    row = {"pred_score": "2+", "prob_her2_0": 0.1, "prob_her2_1plus": 0.2, "prob_her2_2plus": 0.6,
           "prob_her2_3plus": 0.1, "fold_std": 0.05}
    title = prediction_title("S1", row)
    assert "HER2 2+ (HER2-low)" in title and "P(2+)=0.60" in title and "fold std 0.05" in title
    assert "no prediction" in prediction_title("S1", None)


def test_png_panels_keep_aspect_and_hot_region_is_the_planted_quadrant(cmu_small_region):
    from matplotlib import colormaps

    from her2ray.heatmaps.render import scale_bar_um
    from her2ray.slides import open_slide
    from her2ray.tiling.mask import tissue_mask

    with open_slide(str(cmu_small_region)) as reader:
        thumb = reader.thumbnail(400)
        dims, mpp = reader.dimensions, reader.mpp
    assert dims == CMU_DIMS
    th, tw = thumb.shape[:2]
    tissue = tissue_mask(thumb, fill_holes=False)
    assert 0.2 < tissue.mean() < 0.8
    x, y = full_grid()
    scores, hot_tiles = planted_scores(x, y)
    png, layout = render_heatmap(thumb, dims, x, y, scores, TILE, title="CMU: predicted HER2 3+", alpha=0.6,
                                 slide_mpp=mpp, tissue=tissue)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)
    assert img.shape[:2] == (layout.height, layout.width)
    # side by side: two thumbnail-sized panels + colour bar margins
    assert layout.thumbnail_box[2:] == (tw, th) and layout.heatmap_box[2:] == (tw, th)
    assert 2 * tw < layout.width < 2 * tw + 160
    assert abs(tw / th - dims[0] / dims[1]) < 0.01
    left, top, w, h = layout.thumbnail_box
    thumb_panel = img[top:top + h, left:left + w]
    bar_um, bar_px = scale_bar_um(mpp * dims[0] / tw, tw)
    assert bar_um == 200 and abs(bar_px - 200 / (mpp * dims[0] / tw)) <= 1
    # the scale bar: one black run of bar_px pixels near the bottom-left, the rest of the thumbnail 1:1
    dark_rows = [r for r in range(int(0.85 * h), h) if (thumb_panel[r, : w // 2].max(axis=-1) < 40).sum() >= bar_px - 2]
    assert dark_rows and all((thumb_panel[r, : w // 2].max(axis=-1) < 40).sum() <= bar_px + 2 for r in dark_rows)
    np.testing.assert_allclose(thumb_panel[: int(0.8 * h)], thumb[: int(0.8 * h)], atol=2)
    left, top, w, h = layout.heatmap_box
    panel = img[top:top + h, left:left + w]
    hot_rgb = np.array(colormaps["viridis"](1.0)[:3]) * 255
    expected_hot = 0.6 * hot_rgb + 0.4 * thumb
    hot = np.abs(panel - expected_hot).max(axis=-1) < 12
    yy, xx = np.mgrid[0:h, 0:w]
    quadrant = (xx < w / 2) & (yy < h / 2)
    assert hot.sum() > 0.015 * w * h          # the quadrant holds little tissue on this slide
    assert hot[quadrant].sum() / hot.sum() > 0.98
    # the planted tiles' area (in thumbnail px) is hot almost everywhere on tissue ...
    planted = score_grid(x[hot_tiles], y[hot_tiles], np.ones(hot_tiles.sum()), TILE, dims, (h, w)) == 1
    assert hot[planted & tissue].mean() > 0.95
    # ... and absent off tissue and nearly transparent where attention is low (the slide shows through)
    body = (yy < 0.8 * h)
    np.testing.assert_allclose(panel[~tissue & body], thumb[~tissue & body], atol=3)
    low = ~quadrant & tissue & body & (score_grid(x, y, scores, TILE, dims, (h, w)) < 0.2)
    assert np.abs(panel[low] - thumb[low]).max(axis=-1).mean() < 25


def test_random_weights_stamp_truth_and_cohort_scale(cmu_small_region):
    from her2ray.heatmaps.render import RANDOM_WEIGHTS_STAMP, relative_attention

    thumb = np.full((200, 150, 3), 235, np.uint8)
    x, y = full_grid()
    scores, _ = planted_scores(x, y)
    plain, lay_plain = render_heatmap(thumb, CMU_DIMS, x, y, scores, TILE, title="t")
    stamped, lay_stamped = render_heatmap(thumb, CMU_DIMS, x, y, scores, TILE, title="t", random_weights=True)
    assert lay_stamped.height > lay_plain.height          # a banner line above the title
    img = np.asarray(Image.open(io.BytesIO(stamped)).convert("RGB")).astype(int)
    banner = img[: lay_stamped.thumbnail_box[1]]
    red = (banner[..., 0] > 170) & (banner[..., 1] < 80) & (banner[..., 2] < 80)
    assert red.sum() > 500 and "RANDOM WEIGHTS" in RANDOM_WEIGHTS_STAMP
    assert "true HER2 2+" in prediction_title("S", {"pred_score": "3+"}, truth="2+")
    assert "true" not in prediction_title("S", {"pred_score": "3+"})
    # cohort scale: attention relative to the slide mean, so a slide with twice the tiles is not paler
    rel = relative_attention(np.array([0.1, 0.3, np.nan]))
    np.testing.assert_allclose(rel[:2], [0.5, 1.5])
    a, _ = render_heatmap(thumb, CMU_DIMS, x, y, relative_attention(scores), TILE, value_range=(0.0, 4.0))
    b, _ = render_heatmap(thumb, CMU_DIMS, x, y, relative_attention(scores * 7), TILE, value_range=(0.0, 4.0))
    assert a == b


def test_geojson_is_qupath_detections_on_the_tiles():
    x, y = full_grid()
    scores, _ = planted_scores(x, y)
    scores[3] = np.nan                                   # no score -> no detection (JSON has no NaN)
    fc = tiles_feature_collection(x, y, scores, TILE, slide_id="CMU")
    fc = json.loads(json.dumps(fc, allow_nan=False))
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(x) - 1
    keep = np.ones(len(x), bool)
    keep[3] = False
    for feat, xi, yi, si in zip(fc["features"], x[keep], y[keep], scores[keep]):
        assert feat["type"] == "Feature"
        geom = feat["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
        ring = np.array(geom["coordinates"][0])
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        assert (ring.min(0) == [xi, yi]).all() and (ring.max(0) == [xi + TILE, yi + TILE]).all()
        props = feat["properties"]
        assert props["objectType"] == "detection"
        value = props["measurements"]["attention"]
        assert isinstance(value, float) and value == pytest.approx(si)


def _write_attention(url, slide_id, x, y, scores, tile):
    from her2ray.scoring.engine import attention_table

    meta = FeatureFileMeta(slide_id=slide_id, encoder={"name": "toy"}, tile_px=256, target_mpp=0.5,
                           slide_mpp=0.499, level=0, tile_size_level0_px=tile)
    sf = SlideFeatures(slide_id=slide_id, x=x, y=y, tissue_fraction=np.ones(len(x), np.float32),
                       features=np.zeros((len(x), 1), np.float32), meta=meta)
    storage.write_parquet_atomic(attention_table(sf, np.arange(len(x)), scores), url)


def _cli(argv):
    from her2ray.cli import heatmap as heatmap_cli

    parser = argparse.ArgumentParser()
    heatmap_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["heatmap", *argv])
    return args.func(args)


def test_heatmap_cli_on_ray_local_and_s3_slides(ray_session, cmu_small_region, s3_bucket, tmp_path):
    x, y = full_grid()
    scores, _ = planted_scores(x, y)
    scores_dir = tmp_path / "scores"
    _write_attention(str(scores_dir / "attention" / "CMU-local.parquet"), "CMU-local", x, y, scores, TILE)
    _write_attention(str(scores_dir / "attention" / "CMU-s3.parquet"), "CMU-s3", x, y, scores[::-1].copy(), TILE)
    preds = pa.table({"slide_id": ["CMU-local"], "pred_score": ["3+"], "prob_her2_0": [0.1],
                      "prob_her2_1plus": [0.1], "prob_her2_2plus": [0.1], "prob_her2_3plus": [0.7],
                      "fold_std": [0.02]})
    storage.write_parquet_atomic(preds, str(scores_dir / "predictions.parquet"))
    s3_slide = f"{s3_bucket}/slides/CMU-1-Small-Region.svs"
    storage.write_bytes_atomic(s3_slide, cmu_small_region.read_bytes())
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide_id,path,her2_score\nCMU-local,{cmu_small_region},2+\nCMU-s3,{s3_slide},\n"
                        f"no-attention,{cmu_small_region},0\nCMU-gone,{tmp_path / 'gone.svs'},1+\n")
    _write_attention(str(scores_dir / "attention" / "CMU-gone.parquet"), "CMU-gone", x, y, scores, TILE)
    from her2ray.heatmaps.pipeline import plan_jobs

    jobs, _ = plan_jobs(str(scores_dir / "attention"), [str(manifest)])
    assert {j.slide_id: j.truth for j in jobs} == {"CMU-local": "2+", "CMU-s3": None, "CMU-gone": "1+"}
    out = f"{s3_bucket}/heatmaps"
    rc = _cli(["--scores", str(scores_dir), "--slides", str(manifest), "--out", out, "--max-px", "256",
               "--slide-id", "CMU-local", "CMU-s3", "no-attention", "CMU-gone", "--no-progress", "--scale",
               "cohort"])
    assert rc == 1                                         # one slide could not be rendered
    status = {r["slide_id"]: r for r in pacsv.read_csv(io.BytesIO(storage.read_bytes(f"{out}/heatmaps.csv")),
                                                       read_options=pacsv.ReadOptions()).to_pylist()}
    assert status["CMU-local"]["status"] == "ok" and status["CMU-s3"]["status"] == "ok"
    assert "no attention file" in status["no-attention"]["reason"]
    assert status["CMU-gone"]["reason"].startswith("preflight: ") and "file not found" in status["CMU-gone"]["reason"]
    for sid in ("CMU-local", "CMU-s3"):
        img = Image.open(io.BytesIO(storage.read_bytes(f"{out}/{sid}.png")))
        assert img.width > 2 * 190 and img.height > 256
        fc = json.loads(storage.read_text(f"{out}/{sid}.geojson"))
        assert len(fc["features"]) == len(x)
        assert fc["features"][0]["geometry"]["coordinates"][0][2] == [x[0] + TILE, y[0] + TILE]

    # local mode, slide given as a path (id = file stem), attention folder + tile size from the file metadata
    att = tmp_path / "att2"
    _write_attention(str(att / "CMU-1-Small-Region.parquet"), "CMU-1-Small-Region", x, y, scores, TILE)
    out2 = tmp_path / "hm2"
    rc = _cli(["--attention", str(att), "--slides", str(cmu_small_region), "--out", str(out2), "--local",
               "--max-px", "200", "--no-geojson", "--no-progress", "--cmap", "viridis"])
    assert rc == 0 and (out2 / "CMU-1-Small-Region.png").exists()
    assert not (out2 / "CMU-1-Small-Region.geojson").exists()
    assert os.path.exists(out2 / "heatmaps.csv")
