"""Scoring: the engine equals the fold ensemble applied by hand, the Ray pipeline keeps the driver flat,
bad slides are listed with reasons, outputs have the promised columns and types, attention rows match tiles.

Every run folder here is made the way `her2ray train` writes it (RUN/folds/fold-<k>/best.pt in the best.pt
contract + RUN/run.json) from small models built through the models API; feature stores are real Parquet files
written with the feature schema.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from her2ray import storage
from her2ray.features.schema import CATALOG_FILE, FeatureFileMeta, build_feature_table, feature_url
from her2ray.labels import PROB_COLUMNS
from her2ray.models import build_model
from her2ray.models.kernels import build_kernels

ENCODER = {"name": "toy", "architecture": "none", "weights_sha256": "ab" * 32}
KAT_HP = {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "mlp_dim": 32, "npk": 4, "dropout": 0.0,
          "emb_dropout": 0.0}
ABMIL_HP = {"dim": 16, "dropout": 0.0}


# --------------------------------------------------------------------------------------------------------
# fixtures: feature stores and training runs

def write_slide(store: str, slide_id: str, n_tiles: int, dim: int, rng, tile: float = 256.0, cols: int = 5,
                encoder: dict | None = None) -> str:
    idx = np.arange(n_tiles)
    x = np.rint((idx % cols) * tile + 1000).astype(np.int64)
    y = np.rint((idx // cols) * tile + 500).astype(np.int64)
    feats = rng.normal(size=(n_tiles, dim)).astype(np.float32)
    meta = FeatureFileMeta(slide_id=slide_id, encoder=dict(encoder or ENCODER, dim=dim), tile_px=256,
                           target_mpp=0.5, slide_mpp=0.5 * 256 / tile, level=0, tile_size_level0_px=tile)
    url = feature_url(store, slide_id)
    storage.write_parquet_atomic(build_feature_table(slide_id, x, y, np.ones(n_tiles, np.float32), feats, meta), url)
    return url


def make_store(store: str, ids, n_tiles: int = 20, dim: int = 16, seed: int = 0, failed=(), skipped=(),
               catalog: bool = True) -> str:
    rng = np.random.default_rng(seed)
    rows = []
    for sid in ids:
        if sid in failed:
            rows.append({"slide_id": sid, "status": "failed", "error": "NoTissueError: no tile above threshold"})
            continue
        write_slide(store, sid, n_tiles, dim, rng)
        rows.append({"slide_id": sid, "status": "skipped" if sid in skipped else "ok", "error": ""})
    if catalog:
        storage.write_parquet_atomic(pa.Table.from_pylist(rows), storage.join(store, CATALOG_FILE))
    return store


def make_run(run: str, dim: int = 16, n_folds: int = 3, model: str = "kat", max_nodes: int = 4096,
             seed: int = 0) -> str:
    """A training run folder in the best.pt contract, with distinct random weights per fold."""
    hp = KAT_HP if model == "kat" else ABMIL_HP
    for k in range(n_folds):
        torch.manual_seed(seed + 100 * k)
        net = build_model(model, dim, 4, **hp)
        payload = {"state_dict": net.state_dict(), "model_name": model, "hparams": dict(hp), "patch_dim": dim,
                   "num_classes": 4, "fold": k, "epoch": 3, "val_metrics": {"auc_macro_ovr": 0.5, "loss": 1.0},
                   "encoder": dict(ENCODER, dim=dim), "feature_settings": {"tile_px": 256, "target_mpp": 0.5},
                   "data_settings": {"npk": KAT_HP["npk"], "max_nodes": max_nodes}}
        buf = __import__("io").BytesIO()
        torch.save(payload, buf)
        storage.write_bytes_atomic(storage.join(run, "folds", f"fold-{k}", "best.pt"), buf.getvalue())
    storage.write_text_atomic(storage.join(run, "run.json"), json.dumps({"stage": "train", "run_id": "toy-run"}))
    return run


def direct_ensemble(run: str, url: str, npk: int, max_nodes: int) -> np.ndarray:
    """The reference: each fold model in eval mode on build_kernels' bag, mean of softmax."""
    from her2ray.features.schema import read_slide_features

    sf = read_slide_features(url)
    plan = build_kernels(sf.coords, sf.meta.tile_size_level0_px, npk, max_nodes=max_nodes)
    feats = torch.tensor(sf.features[plan.kept]).unsqueeze(0)
    dist = torch.tensor(plan.anchor_dist).unsqueeze(0)
    probs = []
    for k in sorted(os.listdir(os.path.join(run, "folds"))):
        ckpt = torch.load(os.path.join(run, "folds", k, "best.pt"), weights_only=False)
        net = build_model(ckpt["model_name"], ckpt["patch_dim"], 4, **ckpt["hparams"])
        net.load_state_dict(ckpt["state_dict"])
        net.eval()
        with torch.no_grad():
            probs.append(torch.softmax(net(feats, dist), -1)[0].numpy())
    return np.mean(probs, axis=0)


# --------------------------------------------------------------------------------------------------------
# engine (no Ray)

@pytest.mark.parametrize("model,max_nodes", [("kat", 4096), ("kat", 12), ("abmil", 4096)])
def test_engine_equals_fold_ensemble_applied_directly(tmp_path, model, max_nodes):
    from her2ray.scoring.engine import FoldEnsemble, score_slide

    store, run = str(tmp_path / "store"), make_run(str(tmp_path / "run"), model=model, max_nodes=max_nodes)
    rng = np.random.default_rng(1)
    url = write_slide(store, "S-1", 37, 16, rng, tile=256.5, cols=7)          # fractional stride, ragged grid
    ens = FoldEnsemble.from_run(run, device="cpu")
    assert (ens.npk, ens.max_nodes, len(ens.models)) == (4, max_nodes, 3)
    row = score_slide(ens, "S-1", url, out_dir=str(tmp_path / "out"), attention=True)
    assert row["status"] == "ok", row["error"]
    expected = direct_ensemble(run, url, 4, max_nodes)
    got = np.array([row[c] for c in PROB_COLUMNS])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert abs(got.sum() - 1) < 1e-6
    assert row["pred_score"] == ("0", "1+", "2+", "3+")[int(np.argmax(expected))]
    assert row["n_tiles"] == 37 and row["n_folds"] == 3
    kept = build_kernels(_coords(url), 256.5, 4, max_nodes=max_nodes).kept
    assert row["n_tiles_used"] == len(kept) and (len(kept) < 37) == (max_nodes < 37)
    # attention: one row per tile of the feature file, same x, y, same order
    att = pq.read_table(row["attention_url"])
    feat = pq.read_table(url)
    assert att.column("x").to_pylist() == feat.column("x").to_pylist()
    assert att.column("y").to_pylist() == feat.column("y").to_pylist()
    scores = att.column("score").to_numpy()
    assert np.isfinite(scores).all() and (scores >= 0).all()
    assert att.column("kept").to_numpy(zero_copy_only=False).sum() == row["n_tiles_used"]
    meta = json.loads(att.schema.metadata[b"her2ray_attention"])
    assert meta["tile_size_level0_px"] == 256.5


def _coords(url):
    t = pq.read_table(url, columns=["x", "y"])
    return np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], 1)


def test_attention_equals_tile_attention_scores(tmp_path):
    """The one-pass attention of scoring is the KAT module's tile_attention_scores, averaged over folds."""
    from her2ray.models.kat import tile_attention_scores
    from her2ray.scoring.engine import FoldEnsemble
    from her2ray.features.schema import read_slide_features

    run = make_run(str(tmp_path / "run"), n_folds=2)
    url = write_slide(str(tmp_path / "store"), "S1", 30, 16, np.random.default_rng(2))
    ens = FoldEnsemble.from_run(run, device="cpu")
    bag = ens.prepare(read_slide_features(url))
    out = ens.predict(bag, attention=True)
    ref = np.mean([tile_attention_scores(m, bag.as_batch())[0].numpy() for m in ens.models], axis=0)
    np.testing.assert_allclose(out.attention, ref, atol=1e-6)
    no_att = ens.predict(bag, attention=False)
    np.testing.assert_allclose(no_att.fold_probs, out.fold_probs, atol=1e-6)   # same logits either way


def test_engine_reports_unscorable_slides(tmp_path):
    from her2ray.scoring.engine import FoldEnsemble, score_slide

    store = str(tmp_path / "store")
    run = make_run(str(tmp_path / "run"), n_folds=2)
    rng = np.random.default_rng(0)
    write_slide(store, "wrongdim", 10, 8, rng)
    write_slide(store, "wrongenc", 10, 16, rng, encoder={**ENCODER, "name": "other", "weights_sha256": "cd" * 32})
    bad = feature_url(store, "corrupt")
    storage.write_bytes_atomic(bad, b"not a parquet file")
    ens = FoldEnsemble.from_run(run, device="cpu")
    reasons = {sid: score_slide(ens, sid, feature_url(store, sid)) for sid in
               ("wrongdim", "wrongenc", "corrupt", "absent")}
    assert all(r["status"] == "failed" for r in reasons.values())
    assert "patch_dim 16" in reasons["wrongdim"]["error"]
    assert "encoder other" in reasons["wrongenc"]["error"]
    assert reasons["corrupt"]["error"] and reasons["absent"]["error"].startswith("FeatureStoreError")
    assert np.isnan(reasons["corrupt"]["prob_her2_0"])


def test_engine_reads_run_and_features_from_s3(s3_bucket, tmp_path):
    from her2ray.scoring.engine import FoldEnsemble, score_slide

    run = make_run(f"{s3_bucket}/runs/r1", n_folds=2)
    url = write_slide(f"{s3_bucket}/store", "S3slide", 15, 16, np.random.default_rng(3))
    ens = FoldEnsemble.from_run(run, device="cpu")
    row = score_slide(ens, "S3slide", url, out_dir=f"{s3_bucket}/scores", attention=True)
    assert row["status"] == "ok", row["error"]
    assert row["attention_url"] == f"{s3_bucket}/scores/attention/S3slide.parquet"
    assert storage.read_parquet(row["attention_url"]).num_rows == 15
    np.testing.assert_allclose([row[c] for c in PROB_COLUMNS], _direct_s3(run, url, tmp_path), atol=1e-5)


def _direct_s3(run, url, tmp_path):
    local_run, local_url = tmp_path / "run", tmp_path / "f.parquet"
    for k in (0, 1):
        (local_run / "folds" / f"fold-{k}").mkdir(parents=True, exist_ok=True)
        (local_run / "folds" / f"fold-{k}" / "best.pt").write_bytes(
            storage.read_bytes(f"{run}/folds/fold-{k}/best.pt"))
    local_url.write_bytes(storage.read_bytes(url))
    return direct_ensemble(str(local_run), str(local_url), 4, 4096)


def test_missing_run_is_a_clean_error(tmp_path):
    from her2ray.errors import ConfigError
    from her2ray.scoring.engine import FoldEnsemble

    with pytest.raises(ConfigError, match="no fold checkpoints"):
        FoldEnsemble.from_run(str(tmp_path / "nothing"))


# --------------------------------------------------------------------------------------------------------
# Ray pipeline + CLI

def _cli(argv):
    from her2ray.cli import score as score_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    score_cli.add_parser(sub)
    args = parser.parse_args(["score", *argv])
    return args.func(args)


def test_score_cli_on_ray_outputs_and_failures(ray_session, tmp_path):
    ids = [f"S{i:02d}" for i in range(10)]
    store = make_store(str(tmp_path / "store"), ids, failed=("S03",), skipped=("S02",))  # skipped = reused, usable
    os.remove(feature_url(store, "S05"))                           # catalog says ok, file gone
    storage.write_bytes_atomic(feature_url(store, "S07"), b"garbage")   # unreadable file
    run = make_run(str(tmp_path / "run"), n_folds=2)
    manifest = tmp_path / "m.csv"
    rows = ["slide_id,her2_score,center,n_tiles"] + [f"{s},{i % 4}+,C{i % 2},x" for i, s in enumerate(ids)]
    manifest.write_text("\n".join(rows + ["S99,1+,C1,x"]) + "\n")    # S99: not in the store at all
    out = str(tmp_path / "scores")
    rc = _cli(["--features", store, "--model", run, "--out", out, "--manifest", str(manifest), "--attention",
               "--batch-slides", "3", "--actors", "2", "--no-progress"])
    assert rc == 0
    preds = pq.read_table(os.path.join(out, "predictions.parquet"))
    assert preds.column("slide_id").to_pylist() == ["S00", "S01", "S02", "S04", "S06", "S08", "S09"]
    types = {f.name: f.type for f in preds.schema}
    for c in PROB_COLUMNS + ("fold_std",):
        assert types[c] == pa.float64()
    assert types["pred_score"] == pa.string() and types["her2_low"] == pa.bool_()
    assert types["n_tiles"] == pa.int64()
    assert {"model_run_id", "model_sha256", "her2_score", "center", "manifest_n_tiles"} <= set(types)
    d = preds.to_pylist()
    for r in d:
        probs = np.array([r[c] for c in PROB_COLUMNS])
        assert abs(probs.sum() - 1) < 1e-6
        assert r["pred_score"] == ("0", "1+", "2+", "3+")[int(probs.argmax())]
        assert r["her2_low"] == (r["pred_score"] in ("1+", "2+"))
        assert r["fold_std"] >= 0 and r["n_tiles"] == 20 and r["model_run_id"] == "toy-run"
        assert len(r["model_sha256"]) == 64
        att = pq.read_table(r["attention_url"])
        assert att.column("x").to_pylist() == pq.read_table(feature_url(store, r["slide_id"])).column("x").to_pylist()
    assert d[0]["her2_score"] == "0+" and d[0]["center"] == "C0"   # carried as given (strings)
    # one of them, checked against the ensemble applied by hand
    np.testing.assert_allclose([d[1][c] for c in PROB_COLUMNS],
                               direct_ensemble(run, feature_url(store, "S01"), 4, 4096), atol=1e-5)
    csv = pacsv.read_csv(os.path.join(out, "predictions.csv"))
    assert csv.num_rows == 7 and csv.column_names == preds.column_names
    failed = {r["slide_id"]: r for r in pacsv.read_csv(os.path.join(out, "failed.csv")).to_pylist()}
    assert set(failed) == {"S03", "S05", "S07", "S99"}
    assert "NoTissueError" in failed["S03"]["reason"] and failed["S03"]["stage"] == "features"
    assert "listed as ok" in failed["S05"]["reason"]
    assert failed["S07"]["stage"] == "scoring"
    assert "not in the feature store" in failed["S99"]["reason"]
    record = json.loads(open(os.path.join(out, "run.json")).read())
    assert record["stage"] == "score" and record["summary"]["n_scored"] == 7
    assert record["model"]["sha256"] == d[0]["model_sha256"] and len(record["model"]["folds"]) == 2


def test_score_cli_bad_model_is_a_clean_error(tmp_path, capsys):
    from her2ray.cli import main

    store = make_store(str(tmp_path / "store"), ["A"])
    try:
        rc = main(["score", "--features", store, "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    except ModuleNotFoundError as exc:      # another stage's CLI module not written yet
        pytest.skip(f"CLI not complete yet: {exc}")
    assert rc == 2
    assert "no fold checkpoints" in capsys.readouterr().err


def _driver_peak(store, run, out, n):
    from her2ray.scoring.pipeline import ScoreConfig, score_cohort

    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    summary = score_cohort(ScoreConfig(features=store, model=run, out=out, batch_slides=16, actors=1,
                                       progress=False))
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert summary.n_scored == n
    return peak


@pytest.mark.parametrize("small,large", [(30, 300), pytest.param(100, 1000, marks=pytest.mark.skipif(
    os.environ.get("HER2RAY_LONG_TESTS") != "1", reason="opt-in (HER2RAY_LONG_TESTS=1): 1,000 slides, ~60 s"))])
def test_driver_memory_flat_in_cohort_size(ray_session, tmp_path, small, large):
    """The driver holds ids and small result rows only: 10x the slides must not mean 10x the features.

    A slide here is 64 tiles x 32 dims = 8 KiB of float32 features. The driver's peak (tracemalloc) may grow
    from ``small`` to ``large`` (10x) slides only by its per-slide bookkeeping (id, URL, result row, Ray Data
    block metadata: ~1.5 KB per slide measured), never by the features. A 10-slide run first absorbs one-time
    imports. ABMIL folds keep the model cost out of a test about the driver.
    """
    dim, n_tiles = 32, 64
    ids = [f"T{i:04d}" for i in range(large)]
    big = make_store(str(tmp_path / "big"), ids, n_tiles=n_tiles, dim=dim)
    stores = {}
    for n in (10, small):
        stores[n] = str(tmp_path / f"s{n}")
        os.makedirs(os.path.join(stores[n], "features"))
        for sid in ids[:n]:
            os.link(feature_url(big, sid), feature_url(stores[n], sid))
    run = make_run(str(tmp_path / "run"), dim=dim, n_folds=1, model="abmil")
    _driver_peak(stores[10], run, str(tmp_path / "o10"), 10)
    t0 = time.perf_counter()
    p_small = _driver_peak(stores[small], run, str(tmp_path / "o_small"), small)
    t1 = time.perf_counter()
    p_large = _driver_peak(big, run, str(tmp_path / "o_large"), large)
    t2 = time.perf_counter()
    feature_bytes_per_slide = n_tiles * dim * 4
    growth = (p_large - p_small) / (large - small)
    print(f"driver peak (tracemalloc): {small} slides {p_small / 1e6:.2f} MB, {large} slides {p_large / 1e6:.2f} MB, "
          f"growth {growth:.0f} B per extra slide (features: {feature_bytes_per_slide} B); "
          f"{t1 - t0:.1f} s, {t2 - t1:.1f} s")
    assert growth < feature_bytes_per_slide / 3, (p_small, p_large)
    assert p_large < 8e6


def test_scores_a_real_training_run_like_its_own_test_predictions(tmp_path):
    """Contract check with the training stage: a run folder written by `train_cv` (local, 2 tiny KAT folds)
    scores its held-out slides exactly as training's own test_predictions (fold-mean softmax)."""
    import csv

    from her2ray.scoring.engine import FoldEnsemble, score_slide
    from her2ray.training.config import TrainConfig
    from her2ray.training.run import train_cv
    from her2ray.training.synthetic import make_feature_store

    store = str(tmp_path / "store")
    rows = make_feature_store(store, n_slides=16, n_tiles=25, dim=32, seed=3, signal=8.0)["rows"]
    paths = {}
    for name, part in (("train", rows[:12]), ("test", rows[12:])):
        paths[name] = str(tmp_path / f"{name}.csv")
        with open(paths[name], "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(part[0]))
            w.writeheader()
            w.writerows(part)
    cfg = TrainConfig(model="kat", folds=2, max_epochs=1, patience=1, dim=16, depth=2, heads=2, dim_head=8,
                      mlp_dim=32, npk=4, batch_size=4, dropout=0.1)
    run = str(tmp_path / "run")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_cv(store, paths["train"], run, cfg, test_manifest=paths["test"], local=True)
    finally:
        torch.set_num_threads(old)
    ens = FoldEnsemble.from_run(run, device="cpu")
    assert len(ens.models) == 2 and ens.npk == 4 and ens.max_nodes == cfg.max_nodes
    test = pq.read_table(os.path.join(run, "test_predictions.parquet")).to_pylist()
    assert len(test) == 4
    for ref in test:
        row = score_slide(ens, ref["slide_id"], feature_url(store, ref["slide_id"]))
        assert row["status"] == "ok", row["error"]
        np.testing.assert_allclose([row[c] for c in PROB_COLUMNS], [ref[c] for c in PROB_COLUMNS], atol=1e-5)


def test_scoring_accepts_slides_reused_by_a_resumed_embed_run():
    from her2ray.scoring.pipeline import USABLE_STATUSES as SCORING_USABLE

    assert set(SCORING_USABLE) == {"ok", "skipped"}
