"""BagDataset / collate_bags on real feature files written with the feature-file contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from her2ray import storage
from her2ray.errors import FeatureStoreError
from her2ray.features.schema import FeatureFileMeta, build_feature_table, feature_url
from her2ray.models import bags
from her2ray.models.bags import BagDataset, collate_bags
from her2ray.models.kat import KernelAttentionTransformer, build_kernels

STRIDE = 513.3
DIM = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors / KMeans: extra threads only add spin-waits on a loaded 2-core box."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


def write_slide(store: str, slide_id: str, n_rows: int, n_cols: int, seed: int = 0) -> tuple[str, np.ndarray]:
    """A feature file for a rectangular tissue patch with ~10% holes; returns (url, features float16->32)."""
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(np.arange(n_rows) + 2, np.arange(n_cols) + 1, indexing="ij")
    keep = rng.random(rr.shape) > 0.1
    rows, cols = rr[keep], cc[keep]
    perm = rng.permutation(len(rows))                      # files need not be row-major
    rows, cols = rows[perm], cols[perm]
    x, y = np.rint(cols * STRIDE).astype(np.int64), np.rint(rows * STRIDE).astype(np.int64)
    feats = rng.normal(size=(len(x), DIM)).astype(np.float16)
    meta = FeatureFileMeta(slide_id=slide_id, encoder={"name": "test", "architecture": "none",
                                                       "weights_sha256": "0", "dim": DIM},
                           tile_px=224, target_mpp=0.5, slide_mpp=0.2495, level=0,
                           tile_size_level0_px=STRIDE)
    table = build_feature_table(slide_id, x, y, np.ones(len(x), np.float32), feats, meta)
    url = feature_url(store, slide_id)
    storage.write_parquet_atomic(table, url)
    return url, feats.astype(np.float32)


@pytest.fixture
def store(tmp_path):
    s = str(tmp_path / "store")
    urls = [write_slide(s, "a", 12, 15, 0)[0], write_slide(s, "b", 6, 7, 1)[0], write_slide(s, "c", 3, 2, 2)[0]]
    return s, urls


def test_item_matches_file_and_plan(store):
    _, urls = store
    ds = BagDataset(urls, labels=[3, 0, 1], npk=16)
    item = ds[0]
    from her2ray.features.schema import read_slide_features

    slide = read_slide_features(urls[0])
    plan = build_kernels(slide.coords, STRIDE, npk=16, max_nodes=4096)
    assert item["slide_id"] == "a" and item["label"] == 3 and item["down_factor"] == 1
    assert item["features"].dtype == torch.float32 and item["anchor_dist"].dtype == torch.float32
    np.testing.assert_array_equal(item["features"].numpy(), slide.features[plan.kept])
    np.testing.assert_array_equal(item["coords"].numpy(), slide.coords[plan.kept])
    np.testing.assert_array_equal(item["anchor_dist"].numpy(), plan.anchor_dist)
    assert item["anchor_dist"].shape == (plan.n_kernels, plan.n_tiles)
    # Row-major order of the kept tiles.
    yx = item["coords"].numpy()[:, ::-1]
    assert (np.lexsort((yx[:, 1], yx[:, 0])) == np.arange(len(yx))).all()
    assert BagDataset(urls[:1])[0]["label"] == bags.UNKNOWN_LABEL


def test_plans_are_cached_kmeans_runs_once(store, monkeypatch):
    _, urls = store
    calls = []
    real = bags.build_kernels

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bags, "build_kernels", counting)
    ds = BagDataset(urls, npk=16, aug_rate=0.5)
    ds.precompute_plans()
    for _ in range(3):
        for i in range(len(ds)):
            ds[i]
    assert len(calls) == 3 == ds.kmeans_runs


def test_feature_cache_survives_file_removal(store):
    _, urls = store
    cached, uncached = BagDataset(urls, npk=16, cache_features=True), BagDataset(urls, npk=16)
    first = cached[1]["features"].clone()
    uncached[1]
    storage.remove(urls[1])
    torch.testing.assert_close(cached[1]["features"], first)
    with pytest.raises(FeatureStoreError):
        uncached[1]


def test_tile_dropout_augmentation(store):
    _, urls = store
    plain = BagDataset(urls, npk=16)[0]
    ds = BagDataset(urls, npk=16, aug_rate=0.5, seed=7)
    a, b = ds[0], ds[0]
    for item in (a, b):
        n = item["features"].shape[0]
        assert 0 < n <= plain["features"].shape[0]
        assert item["anchor_dist"].shape == (plain["anchor_dist"].shape[0], n)   # anchors all kept
        # Columns and features follow the surviving tiles (matched through their coordinates).
        lookup = {tuple(c): i for i, c in enumerate(plain["coords"].numpy())}
        cols = np.array([lookup[tuple(c)] for c in item["coords"].numpy()])
        assert (np.diff(cols) > 0).all()                                         # compacted, order kept
        np.testing.assert_array_equal(item["anchor_dist"].numpy(), plain["anchor_dist"].numpy()[:, cols])
        np.testing.assert_array_equal(item["features"].numpy(), plain["features"].numpy()[cols])
    assert not torch.equal(a["coords"], b["coords"])                              # fresh draw per call
    again = BagDataset(urls, npk=16, aug_rate=0.5, seed=7)
    torch.testing.assert_close(again[0]["coords"], a["coords"])                   # seeded
    again.set_epoch(1)
    assert not torch.equal(again[0]["coords"], a["coords"])                       # epoch-dependent
    # Over many draws the kept fraction is about 1 - aug_rate / 2.
    fracs = [ds[0]["features"].shape[0] / plain["features"].shape[0] for _ in range(200)]
    assert abs(np.mean(fracs) - 0.75) < 0.04
    # At least one tile always survives.
    tiny = BagDataset([urls[2]], npk=16, aug_rate=0.999)
    assert all(tiny[0]["features"].shape[0] >= 1 for _ in range(50))


def test_down_sampling_in_bags(tmp_path):
    s = str(tmp_path / "store")
    url, feats = write_slide(s, "big", 30, 30, 3)
    item = BagDataset([url], npk=16, max_nodes=100)[0]
    assert item["down_factor"] == int(np.sqrt(len(feats) / 100)) + 1 == 3
    rows = np.rint(item["coords"].numpy()[:, 1] / STRIDE).astype(int)
    cols = np.rint(item["coords"].numpy()[:, 0] / STRIDE).astype(int)
    assert (rows % item["down_factor"] == 0).all() and (cols % item["down_factor"] == 0).all()


def test_collate_and_model_on_padded_batch(store):
    _, urls = store
    ds = BagDataset(urls, labels=[2, 0, 1], npk=16)
    items = [ds[i] for i in range(3)]
    batch = collate_bags(items)
    n = max(it["features"].shape[0] for it in items)
    m = max(it["anchor_dist"].shape[0] for it in items)
    assert batch["features"].shape == (3, n, DIM) and batch["anchor_dist"].shape == (3, m, n)
    assert batch["tile_mask"].dtype == torch.bool and batch["kernel_mask"].dtype == torch.bool
    assert batch["labels"].tolist() == [2, 0, 1] and batch["labels"].dtype == torch.long
    assert batch["slide_ids"] == ["a", "b", "c"] and len(batch["coords"]) == 3
    for i, it in enumerate(items):
        ni, mi = it["features"].shape[0], it["anchor_dist"].shape[0]
        assert batch["tile_mask"][i].sum() == ni and batch["kernel_mask"][i].sum() == mi
        assert (batch["features"][i, ni:] == 0).all() and (batch["anchor_dist"][i, mi:] == 0).all()
    torch.manual_seed(0)
    model = KernelAttentionTransformer(DIM, 4, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, npk=16).eval()
    logits = model(batch["features"], batch["anchor_dist"], batch["tile_mask"], batch["kernel_mask"])
    for i, it in enumerate(items):
        alone = model(it["features"][None], it["anchor_dist"][None])[0]
        torch.testing.assert_close(logits[i], alone, atol=1e-5, rtol=1e-5)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_bags)
    assert [b["features"].shape[0] for b in loader] == [2, 1]


def test_feature_files_on_object_store(s3_bucket):
    url, feats = write_slide(s3_bucket, "remote", 5, 5, 4)
    item = BagDataset([url], labels=[1], npk=16)[0]
    assert item["slide_id"] == "remote" and item["features"].shape[1] == DIM


def test_bad_arguments(store):
    _, urls = store
    with pytest.raises(ValueError, match="labels"):
        BagDataset(urls, labels=[1])
    with pytest.raises(ValueError, match="aug_rate"):
        BagDataset(urls, aug_rate=1.5)
    with pytest.raises(ValueError, match="at least one"):
        collate_bags([])
