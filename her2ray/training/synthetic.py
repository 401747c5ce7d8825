"""A synthetic feature store with a planted tile-level signal, for training tests and benchmarks.

Why: the training stack must be checked end to end (splits -> bags -> KAT/ABMIL -> metrics) in seconds on
CPU, and checked both ways: it learns a real signal (a few percent of a slide's tiles carry a
class-dependent shift, like focal HER2-driven morphology) and it does *not* invent one (no shift -> AUC
near chance). Files are written through the real feature-store contract (``build_feature_table`` +
``write_parquet_atomic``), so the loaders under test are the production ones.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa

from .. import storage
from ..features.schema import CATALOG_FILE, RUN_FILE, FeatureFileMeta, build_feature_table, feature_url
from ..labels import score_name

ENCODER = {"name": "synthetic", "architecture": "gaussian", "weights_sha256": "0" * 64, "dim": 32}


def slide_features(label: int, n_tiles: int, dim: int, rng: np.random.Generator, signal: float,
                   signal_fraction: float, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, features)`` of one slide: tiles on a square grid, N(0,1) features, shifted signal tiles."""
    side = int(np.ceil(np.sqrt(n_tiles)))
    cells = rng.choice(side * side, size=n_tiles, replace=False)
    x = (cells % side).astype(np.int64) * 256
    y = (cells // side).astype(np.int64) * 256
    feats = rng.standard_normal((n_tiles, dim)).astype(np.float32)
    if signal > 0:
        k = max(1, int(round(signal_fraction * n_tiles)))
        idx = rng.choice(n_tiles, size=k, replace=False)
        feats[idx] += signal * directions[label]
    return x, y, feats


def make_feature_store(store: str, n_slides: int = 40, n_tiles: int = 64, dim: int = 32, seed: int = 0,
                       signal: float = 4.0, signal_fraction: float = 0.05, n_centers: int = 1,
                       slides_per_patient: int = 1, failed: tuple[str, ...] = (),
                       missing: tuple[str, ...] = (), manifest_name: str = "manifest.csv") -> dict[str, Any]:
    """Write ``store/features/*.parquet``, ``slides.parquet``, ``run.json`` and ``store/<manifest_name>``.

    Labels cycle 0..3 (balanced); patients own ``slides_per_patient`` consecutive slides (same label);
    centers are assigned per patient round-robin. ``failed`` slide ids get status failed (and no feature
    file); ``missing`` ids get status ok in the catalog but no feature file. Returns
    ``{"manifest": url, "rows": manifest rows}``.
    """
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:4].astype(np.float32)
    rows, catalog = [], []
    for i in range(n_slides):
        patient = i // slides_per_patient
        label = patient % 4
        sid = f"S{i:04d}"
        center = f"C{patient % n_centers}"
        rows.append({"slide_id": sid, "path": f"/slides/{sid}.svs", "patient_id": f"P{patient:04d}",
                     "her2_score": score_name(label), "center": center})
        status, error = ("failed", "SlideReadError: synthetic failure") if sid in failed else ("ok", None)
        catalog.append({"slide_id": sid, "path": f"/slides/{sid}.svs", "status": status, "error": error,
                        "n_tiles": n_tiles if status == "ok" else 0})
        if status != "ok" or sid in missing:
            continue
        x, y, feats = slide_features(label, n_tiles, dim, rng, signal, signal_fraction, directions)
        meta = FeatureFileMeta(slide_id=sid, encoder={**ENCODER, "dim": dim}, tile_px=256, target_mpp=0.5,
                               slide_mpp=0.5, level=0, tile_size_level0_px=256.0)
        table = build_feature_table(sid, x, y, np.ones(n_tiles, np.float32), feats, meta)
        storage.write_parquet_atomic(table, feature_url(store, sid))
    storage.write_parquet_atomic(pa.Table.from_pylist(catalog), storage.join(store, CATALOG_FILE))
    storage.write_text_atomic(storage.join(store, RUN_FILE), json.dumps(
        {"stage": "embed", "encoder": {**ENCODER, "dim": dim}, "config": {"tile_px": 256, "target_mpp": 0.5}}))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    manifest = storage.join(store, manifest_name)
    storage.write_text_atomic(manifest, buf.getvalue())
    return {"manifest": manifest, "rows": rows}
