"""The pipelined embed engine's parts, on CPU: JPEG payloads, device-side assembly/downscale, the fixed-shape
encode loop, the per-slide assembler, and feature equivalence with the reference engine (OpenSlide + CPU).

The Ray pipeline itself runs in tests/test_embed.py (`--engine pipelined`, local and S3) and tests/test_faults.py. CUDA-only assertions skip here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from her2ray.encoders import load_encoder
from her2ray.encoders.device_loop import EncodeLoop
from her2ray.encoders.device_tiles import box_downscale, decode_jpeg_payloads
from her2ray.features.assemble import SlideAssembler
from her2ray.features.embed import EmbedConfig, embed_slide, load_engine_encoder
from her2ray.features.fast_engine import embed_rows_local
from her2ray.features.reading import error_chunk, plan_slide, read_unit
from her2ray.features.schema import feature_url, read_slide_features
from her2ray.slides import open_slide
from her2ray.tiling import TilingConfig, plan_tiles, read_tiles, resize_tile
from her2ray.tiling.jpeg_payload import jpeg_layout, jpeg_payloads


@pytest.fixture(scope="module")
def slide40x(tmp_path_factory) -> str:
    """A synthetic 40x slide: 0.25 um/px with a 1/4/16 pyramid, so 0.5 um/px tiles are read at level 0."""
    from her2ray.synth import write_synthetic_slide

    return write_synthetic_slide(str(tmp_path_factory.mktemp("s40") / "s40.tiff"), 3072, 2048, mpp=0.25,
                                 seed=11, level_step=4)


DICOM = str(Path(__file__).parent / "data" / "cmu1_small_dicom")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_device_box_downscale_equals_pil_box_within_one_grey_level():
    rng = np.random.default_rng(0)
    for read_px in (512, 513, 300):
        tiles = (rng.random((2, read_px, read_px, 3)) * 255).astype(np.uint8)
        ref = np.stack([resize_tile(t, 256) for t in tiles]).astype(np.float64)
        got = box_downscale(torch.from_numpy(tiles).permute(0, 3, 1, 2).float(), 256).permute(0, 2, 3, 1).numpy()
        diff = np.abs(got - ref)                     # PIL rounds to uint8 after each of its two passes
        assert got.shape == ref.shape and diff.max() <= 1.0 and diff.mean() < 0.51, (read_px, diff.max())
        if read_px == 512:                           # integer factor: exactly the 2 x 2 mean
            exact = tiles.reshape(2, 256, 2, 256, 2, 3).astype(np.float64).mean(axis=(2, 4))
            np.testing.assert_allclose(got, exact, atol=1e-4)
    # a tile's pixels do not depend on its batch partners
    one = box_downscale(torch.from_numpy(tiles[:1]).permute(0, 3, 1, 2).float(), 256)
    both = box_downscale(torch.from_numpy(tiles).permute(0, 3, 1, 2).float(), 256)
    assert torch.equal(one[0], both[0])


def test_jpeg_payloads_decode_to_the_readers_pixels(slide40x, cmu_small_region):
    import openslide

    assert openslide.OpenSlide(slide40x).level_downsamples == (1.0, 4.0, 16.0)
    with open_slide(slide40x) as reader:
        grid = plan_tiles(reader, TilingConfig(), keep_mask=False)
        layout = jpeg_layout(reader, grid)
        assert grid.level == 0 and grid.read_px == 512 and layout is not None
        assert (layout.k, layout.file_tile_px, layout.rgb_coded) == (2, 256, False)
        pick = np.array([0, len(grid) // 2, len(grid) - 1])
        raw = read_tiles(reader, grid, pick, resize=False)
        payloads = jpeg_payloads(reader, grid, layout, pick)
    decoded = decode_jpeg_payloads(payloads, layout.k, torch.device("cpu")).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(decoded, raw)                       # assembly is exact
    # Aperio: 240 px RGB-coded JPEG tiles with shared tables; the grid does not line up -> pixels, but the
    # standalone streams (tables merged, Adobe "RGB" marker) decode exactly like tifffile does
    with open_slide(cmu_small_region) as reader:
        grid = plan_tiles(reader, TilingConfig(), keep_mask=False)
        assert jpeg_layout(reader, grid) is None
        src = reader.jpeg_tiles(0)
        assert src.rgb_coded(0)
        streams = [src.jpeg_stream(0, c, r) for r, c in ((0, 0), (3, 4))]
        ref = reader.read_region(0, 0, 0, 240, 240), reader.read_region(4 * 240, 3 * 240, 0, 240, 240)
    from her2ray.tiling.jpeg_payload import pack_streams

    got = decode_jpeg_payloads([pack_streams([s]) for s in streams], 1, torch.device("cpu"))
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g.permute(1, 2, 0).numpy(), r)


def test_dct_scaled_reads_match_decode_plus_box_resize(slide40x, cmu_small_region):
    """1/2-scale DCT decode vs the reference (full decode + PIL box resize): close, not equal; and only where
    every tile lines up (origin and file tiles divisible by the scale, exact 2x read, inside the level)."""
    from her2ray.tiling.scaled_read import dct_scale, scaled_tiles

    for path, mpp, target, bound in ((slide40x, None, 0.5, 0.9), (str(cmu_small_region), 0.5, 1.0, 0.6)):
        with open_slide(path, mpp_override=mpp) as reader:
            grid = plan_tiles(reader, TilingConfig(target_mpp=target), keep_mask=False)
            assert dct_scale(reader, grid) == 2 and grid.read_px == 512
            pick = np.arange(min(12, len(grid)))
            got = scaled_tiles(reader, grid, 2, pick)
            ref = read_tiles(reader, grid, pick)                      # decode at 512 px + PIL BOX to 256
            diff = np.abs(got.astype(np.int16) - ref)
            assert got.shape == ref.shape == (len(pick), 256, 256, 3)
            assert 0 < diff.mean() < bound and np.percentile(diff, 99) <= 4 and diff.max() <= 24, (path, diff.mean())
            src = reader.jpeg_tiles(0)
            with pytest.raises(ValueError, match="cannot be decoded at 1/2"):
                src.read(0, 1, 0, 512, 512, scale=2)                  # odd origin: not whole half-pixels
            assert not src.can_scale(0, 3)
    with open_slide(str(cmu_small_region)) as reader:                  # 0.499 um/px -> 513 px reads: no
        grid = plan_tiles(reader, TilingConfig(target_mpp=1.0), keep_mask=False)
        assert grid.read_px == 513 and dct_scale(reader, grid) is None


def test_transport_preference_and_route_choice(slide40x):
    from her2ray.features.reading import choose_kind, transport_preference

    assert transport_preference("auto", "cuda") == ("scaled", "jpeg", "rgb")
    assert transport_preference("auto", "cpu") == ("scaled", "rgb")
    assert transport_preference("rgb", "cuda") == ("rgb",)
    with pytest.raises(ValueError, match="tile transport must be one of"):
        transport_preference("nvjpeg", "cuda")
    with open_slide(slide40x) as reader:
        grid = plan_tiles(reader, TilingConfig(), keep_mask=False)
        layout = jpeg_layout(reader, grid)
    assert choose_kind(grid, layout, 2, ("scaled", "jpeg", "rgb"), stain=False) == ("rgb", 256, 2)
    assert choose_kind(grid, layout, 2, ("jpeg", "rgb"), stain=False) == ("jpeg", 512, 1)
    assert choose_kind(grid, layout, None, ("scaled", "rgb"), stain=False) == ("rgb", 512, 1)
    assert choose_kind(grid, layout, 2, ("scaled", "rgb"), stain=True) == ("rgb", 256, 1)   # CPU path, as before


@pytest.mark.parametrize("case", ["synthetic-40x", "synthetic-40x-jpeg", "svs-native", "svs-1.0mpp", "svs-2x",
                                  "svs-40x-snapped", "dicom-native", "dicom-2x"])
def test_pipelined_features_equal_reference_engine(case, tmp_path, slide40x, cmu_small_region, tiny_encoder,
                                                   monkeypatch):
    """New path vs today's reference (OpenSlide read, CPU resize): same tiles, cosine >= 0.9999 per tile."""
    path, tiling, transport, mpp, kind, downscale = {
        "synthetic-40x": (slide40x, TilingConfig(), "auto", None, "rgb", "dct-1/2"),
        "synthetic-40x-jpeg": (slide40x, TilingConfig(), "jpeg", None, "jpeg", "device-box"),
        "svs-native": (str(cmu_small_region), TilingConfig(), "auto", None, "rgb", "none"),
        "svs-1.0mpp": (str(cmu_small_region), TilingConfig(target_mpp=1.0), "auto", None, "rgb", "device-box"),
        # 240 px RGB-coded Aperio tiles read at exactly 2x: DCT-scaled decode of tiles that straddle file tiles
        "svs-2x": (str(cmu_small_region), TilingConfig(target_mpp=1.0), "auto", 0.5, "rgb", "dct-1/2"),
        # a 0.252 um/px "40x" scan: 508 px reads by default (rgb route); snapped to 512 -> DCT-scaled
        "svs-40x-snapped": (str(cmu_small_region), TilingConfig(snap_read_px=True), "auto", 0.252, "rgb", "dct-1/2"),
        # DICOM JPEG frames (256 px) through the same routes: compressed 1 x 1 frames, DCT-scaled 2 x 2 frames
        "dicom-native": (DICOM, TilingConfig(), "jpeg", None, "jpeg", "none"),
        "dicom-2x": (DICOM, TilingConfig(target_mpp=1.0), "auto", 0.5, "rgb", "dct-1/2"),
    }[case]
    cfg = EmbedConfig(encoder="open_clip", weights=tiny_encoder, batch_size=8, tiling=tiling)
    enc = load_engine_encoder(cfg)
    row = {"slide_id": "s", "path": path, **({"mpp": mpp} if mpp else {})}
    monkeypatch.setenv("HER2RAY_FAST_TIFF", "0")                          # the reference reads through OpenSlide
    assert embed_slide(row, enc, cfg, str(tmp_path / "ref"))["status"] == "ok"
    monkeypatch.delenv("HER2RAY_FAST_TIFF")
    loop = EncodeLoop(enc, rows=8)
    try:
        st = embed_rows_local([row], loop, cfg, str(tmp_path / "new"), transport=transport)[0]
    finally:
        loop.close()
    ref = read_slide_features(feature_url(str(tmp_path / "ref"), "s"))
    new = read_slide_features(feature_url(str(tmp_path / "new"), "s"))
    assert st["status"] == "ok" and st["n_tiles"] == len(ref.x) > 4
    np.testing.assert_array_equal(new.coords, ref.coords)
    np.testing.assert_array_equal(new.tissue_fraction, ref.tissue_fraction)
    cos = _cos(new.features, ref.features)
    assert cos.min() >= 0.9999, cos.min()
    t = new.meta.extra["transport"]
    assert (t["kind"], t["downscale"]) == (kind, downscale) and t["decoder"].startswith("libjpeg-turbo")
    assert (t["reader_decoder"] or "").startswith("libjpeg-turbo DCT") == downscale.startswith("dct")
    assert new.meta.extra["engine"] == "pipelined" and new.meta.settings_key() == ref.meta.settings_key()
    assert loop.stats.padded_rows == loop.stats.forwards * 8 - loop.stats.rows


def test_fixed_shape_forwards_make_features_independent_of_batch_partners(tiny_encoder, slide40x):
    enc = load_encoder("open_clip", tiny_encoder, device="cpu")
    with open_slide(slide40x) as reader:
        grid = plan_tiles(reader, TilingConfig(), keep_mask=False)
        tiles = read_tiles(reader, grid, np.arange(12), resize=False)         # 512 px: downscaled in the loop
    payloads = [t.tobytes() for t in tiles]
    loop = EncodeLoop(enc, rows=8)
    try:
        def run(ix):
            ix = list(ix)
            return loop.encode_rows(["rgb"] * len(ix), [payloads[i] for i in ix], [512] * len(ix), [0] * len(ix),
                                    [False] * len(ix), 256)

        alone = run([3])
        mixed = run([7, 3, 0, 11, 5, 9, 1, 2, 4, 6])                          # 2 forwards, other partners
        np.testing.assert_array_equal(mixed[1], alone[0])
        results = {}
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, run(range(k, k + 4)))) for k in (0, 8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        np.testing.assert_array_equal(results[8][0], run([8])[0])             # concurrent callers, right rows
        assert loop.stats.forwards == 6 and loop.stats.rows == 1 + 10 + 8 + 1
        assert len(loop._in_rings[512]) == loop.depth + 1                     # one ring of reusable buffers
        if torch.cuda.is_available():  # pragma: no cover - GPU machines only
            assert all(buf.is_pinned() for buf, _ in loop._in_rings[512])
    finally:
        loop.close()


def test_assembler_commits_whole_slides_only(tmp_path, slide40x, tiny_encoder):
    cfg = EmbedConfig(encoder="open_clip", weights=tiny_encoder, batch_size=8)
    enc = load_engine_encoder(cfg)
    rows = [{"slide_id": "a", "path": slide40x}, {"slide_id": "b", "path": slide40x},
            {"slide_id": "c", "path": slide40x}]
    units = plan_slide(rows[0], cfg, unit_tiles=5)
    assert len(units) > 2 and units[0].info is not None and units[1].info is None
    chunks = [c for u in units for c in read_unit(u, cfg, chunk_tiles=4)]
    n = units[0].n_tiles
    store = str(tmp_path)
    asm = SlideAssembler(rows, store, cfg, enc.settings_identity(), {"engine": "pipelined"})

    def encoded(chunk, sid):
        m = len(chunk["kind"])
        return {**chunk, "slide_id": [sid] * m, "feature": np.ones((m, enc.dim), np.float16)}

    for c in chunks[::-1]:                                      # any order, and "a" gets a chunk twice
        asm.add(encoded(c, "a"))
    asm.add(encoded(chunks[0], "a"))
    for c in chunks[:-1]:                                       # "b" loses its last chunk (crashed reader)
        asm.add(encoded(c, "b"))
    asm.add(encoded(chunks[0], "c"))
    asm.add(error_chunk("c", "SlideReadError: tile 7 is truncated"))
    out = {s["slide_id"]: s for s in asm.finish()}
    assert out["a"]["status"] == "ok" and out["a"]["n_tiles"] == n
    assert out["b"]["status"] == "failed" and f"{n - len(chunks[-1]['kind'])} of {n} tiles" in out["b"]["error"]
    assert out["c"]["status"] == "failed" and out["c"]["error"].startswith("SlideReadError")
    assert read_slide_features(feature_url(store, "a")).x.shape == (n,)
    import os

    assert sorted(os.listdir(tmp_path / "features")) == ["a.parquet"]          # never a partial slide file


def test_packed_chunks_fill_forwards_together(slide40x, tiny_encoder):
    """What the Ray encoder stage gets: several packed reader chunks per call (one Ray Data row each, so Ray
    Data never cuts one). A full chunk is a full forward, and the short tails of two read units share a
    forward instead of each being padded; features equal chunk-by-chunk encoding."""
    from her2ray.features.fast_engine import encode_chunk, encode_chunks
    from her2ray.features.reading import pack_chunk, unpack_chunks

    cfg = EmbedConfig(encoder="open_clip", weights=tiny_encoder, batch_size=5)
    enc = load_engine_encoder(cfg)
    units = plan_slide({"slide_id": "a", "path": slide40x}, cfg, unit_tiles=7)
    chunks = [c for u in units[:2] for c in read_unit(u, cfg, chunk_tiles=5)]
    assert [len(c["kind"]) for c in chunks] == [5, 2, 5, 2]
    packed = [pack_chunk(c) for c in chunks]
    batch = {k: np.array([v for p in packed for v in p[k]], dtype=object) for k in packed[0]}
    assert list(batch["tiles"]) == [5, 2, 5, 2]
    loop = EncodeLoop(enc, rows=5)
    try:
        together = encode_chunks(loop, unpack_chunks(batch), cfg.tiling.tile_px)
        assert (loop.stats.forwards, loop.stats.rows, loop.stats.padded_rows) == (3, 14, 1)
        alone = np.concatenate([encode_chunk(loop, c, cfg.tiling.tile_px)["feature"] for c in chunks])
        assert (loop.stats.forwards, loop.stats.padded_rows) == (3 + 4, 1 + 6)     # one by one: 4 forwards
    finally:
        loop.close()
    np.testing.assert_array_equal(together["feature"], alone)
    np.testing.assert_array_equal(together["tile_index"], np.arange(14))
    assert list(together["slide_id"]) == ["a"] * 14
