"""Stain normalisation on real H&E tiles: shifted stains come back, background is untouched, no NaN."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from her2ray.stain import METHODS, build_stain_normalizer, parse_stain_normalization
from her2ray.stain.od import od_to_rgb, rgb_to_od
from her2ray.stain.reference import DEFAULT_MACENKO, DEFAULT_REINHARD, refit_reference_constants

CMU = "derived_CMU-1-Small-Region_L0_x1024_y768_256.png"
BACKGROUND = "derived_CMU-1-Small-Region_L0_x0_y1536_256.png"
OS1 = "derived_OS-1-detail_x128_y128_256.png"
#: A stain shift in OD space: haematoxylin/eosin mixed differently and darker blue, as between scanners/labs.
SHIFT = np.array([[1.0, 0.25, 0.10],
                  [0.05, 0.80, 0.10],
                  [0.20, 0.05, 1.30]])


def _tile(shared_data, name: str) -> np.ndarray:
    return np.asarray(Image.open(shared_data / "tiles" / name).convert("RGB"))


def _shift(tile: np.ndarray) -> np.ndarray:
    return od_to_rgb(rgb_to_od(tile) @ SHIFT)


def _od_stats(tile: np.ndarray) -> np.ndarray:
    od = rgb_to_od(tile).reshape(-1, 3)
    return np.concatenate([od.mean(0), od.std(0)])


def _mean_colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.reshape(-1, 3).mean(0).astype(float) - b.reshape(-1, 3).mean(0)).sum())


@pytest.mark.parametrize("method", METHODS)
def test_shifted_tile_is_mapped_back_to_its_reference(shared_data, method):
    ref = _tile(shared_data, CMU)
    shifted = _shift(ref)
    norm = build_stain_normalizer(method, reference=ref)
    out = norm(shifted[None])
    assert out.shape == (1, 256, 256, 3) and out.dtype == np.uint8
    before, after = _mean_colour_distance(shifted, ref), _mean_colour_distance(out[0], ref)
    assert after < 0.5 * before, (before, after)
    od_before = np.abs(_od_stats(shifted) - _od_stats(ref)).sum()
    od_after = np.abs(_od_stats(out[0]) - _od_stats(ref)).sum()
    assert od_after < 0.5 * od_before, (od_before, od_after)
    mae_before = np.abs(shifted.astype(int) - ref).mean()
    assert np.abs(out[0].astype(int) - ref).mean() < 0.6 * mae_before


@pytest.mark.parametrize("method", METHODS)
def test_default_target_removes_the_shift(shared_data, method):
    """With the shipped target, a tile and its stain-shifted copy end up close together."""
    tile = _tile(shared_data, CMU)
    shifted = _shift(tile)
    norm = build_stain_normalizer(method)
    a, b = norm(np.stack([tile, shifted]))
    assert _mean_colour_distance(a, b) < 0.5 * _mean_colour_distance(tile, shifted)
    # a tile from another lab/scanner (OS-1, Hamamatsu) moves towards the target (CMU, Aperio) colours
    os1, cmu_norm = _tile(shared_data, OS1), norm(tile)
    assert _mean_colour_distance(norm(os1), cmu_norm) < 0.6 * _mean_colour_distance(os1, cmu_norm)


@pytest.mark.parametrize("method", METHODS)
def test_background_and_degenerate_tiles_unchanged(shared_data, method):
    norm = build_stain_normalizer(method)
    bg = _tile(shared_data, BACKGROUND)
    white = np.full((64, 64, 3), 255, np.uint8)
    black = np.zeros((64, 64, 3), np.uint8)
    grey = np.full((64, 64, 3), 128, np.uint8)
    for tile in (bg, white, black, grey):
        out = norm(tile[None])[0]
        assert np.array_equal(out, tile)
    noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = norm(noise)
    assert out.dtype == np.uint8 and out.shape == noise.shape


def test_macenko_to_own_stains_is_identity_and_background_kept(shared_data):
    ref = _tile(shared_data, CMU)
    assert np.abs(build_stain_normalizer("macenko", ref)(ref).astype(int) - ref).mean() < 0.5
    # a tissue tile with white margins: the margins stay bit-identical
    tile = ref.copy()
    tile[:, :64] = 250
    out = build_stain_normalizer("macenko")(tile)
    assert np.array_equal(out[:, :64], tile[:, :64]) and not np.array_equal(out[:, 64:], tile[:, 64:])


def test_names_api_and_errors(shared_data):
    m, r = build_stain_normalizer("macenko"), build_stain_normalizer("Reinhard")
    assert m.name.startswith("macenko:") and r.name.startswith("reinhard:") and len(m.name) == len("macenko:") + 12
    assert m.name == build_stain_normalizer("macenko").name                       # stable
    assert build_stain_normalizer("macenko", _tile(shared_data, OS1)).name != m.name  # target is in the name
    assert parse_stain_normalization(None) is None and parse_stain_normalization("none") is None
    assert parse_stain_normalization("macenko").name == m.name
    single = _tile(shared_data, CMU)
    assert m(single).shape == single.shape                                          # one [H,W,3] tile is fine
    clone = pickle.loads(pickle.dumps(r))                                           # ships to Ray workers
    assert clone.name == r.name and np.array_equal(clone(single), r(single))
    with pytest.raises(ValueError, match="unknown stain"):
        build_stain_normalizer("vahadane")
    with pytest.raises(TypeError, match="uint8"):
        m(single.astype(np.float32))
    with pytest.raises(ValueError, match="too little"):
        build_stain_normalizer("macenko", _tile(shared_data, BACKGROUND))


def test_shipped_constants_match_their_documented_source(shared_data):
    mac, rei = refit_reference_constants(shared_data / "tiles")
    np.testing.assert_allclose(mac.stain_matrix, DEFAULT_MACENKO.stain_matrix, atol=1e-5)
    np.testing.assert_allclose(mac.max_concentrations, DEFAULT_MACENKO.max_concentrations, atol=1e-5)
    np.testing.assert_allclose(rei.means, DEFAULT_REINHARD.means, atol=1e-4)
    np.testing.assert_allclose(rei.stds, DEFAULT_REINHARD.stds, atol=1e-4)
