"""The per-slide feature file contract: ``<store>/features/<slide_id>.parquet``.

Columns: ``slide_id`` (string), ``x``, ``y`` (int64, level-0 pixels of the tile's top-left corner),
``tissue_fraction`` (float32), ``feature`` (fixed-size list of float16, length = encoder dim).
The schema metadata key ``her2ray`` holds JSON provenance (see ``FeatureFileMeta``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from .. import __version__, storage
from ..errors import FeatureStoreError

SCHEMA_VERSION = 1
META_KEY = b"her2ray"
FEATURES_DIR = "features"
CATALOG_FILE = "slides.parquet"
RUN_FILE = "run.json"

#: catalog (slides.parquet) statuses; "skipped" = a valid file reused by a resumed embed run
STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"
USABLE_STATUSES: tuple[str, ...] = (STATUS_OK, STATUS_SKIPPED)


def is_usable(status: str | None) -> bool:
    """True when a catalog status means the slide has a valid feature file."""
    return status in USABLE_STATUSES


def feature_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("slide_id", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("tissue_fraction", pa.float32()),
        ("feature", pa.list_(pa.float16(), dim)),
    ])


@dataclass(frozen=True)
class FeatureFileMeta:
    """Provenance stored in every feature file; two files are comparable only if these settings match."""

    slide_id: str
    encoder: dict[str, Any]          # name, architecture, weights_sha256, dim
    tile_px: int                     # tile edge in pixels at target_mpp (what the encoder saw, before resize)
    target_mpp: float                # microns per pixel the tiles were read at
    slide_mpp: float                 # level-0 microns per pixel used for this slide
    level: int                       # pyramid level read
    tile_size_level0_px: float       # tile edge (= grid stride) in level-0 pixels
    stain_normalization: str | None = None
    her2ray_version: str = __version__
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "") -> "FeatureFileMeta":
        try:
            data = json.loads(raw)
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise FeatureStoreError(f"{source}: invalid her2ray feature metadata: {exc}") from None

    def settings_key(self) -> dict[str, Any]:
        """The settings that must match for a file to be reused (resume) or mixed with others."""
        return {"encoder": self.encoder, "tile_px": self.tile_px, "target_mpp": self.target_mpp,
                "stain_normalization": self.stain_normalization, "schema_version": self.schema_version}


def build_feature_table(slide_id: str, x: np.ndarray, y: np.ndarray, tissue_fraction: np.ndarray,
                        features: np.ndarray, meta: FeatureFileMeta) -> pa.Table:
    """Arrow table for one slide, features stored as float16."""
    features = np.asarray(features)
    n, dim = features.shape
    if not (len(x) == len(y) == len(tissue_fraction) == n):
        raise ValueError(f"{slide_id}: coordinate and feature row counts differ")
    flat = pa.array(features.astype(np.float16).reshape(-1), type=pa.float16())
    table = pa.Table.from_arrays([
        pa.array([slide_id] * n, type=pa.string()),
        pa.array(np.asarray(x, dtype=np.int64)),
        pa.array(np.asarray(y, dtype=np.int64)),
        pa.array(np.asarray(tissue_fraction, dtype=np.float32)),
        pa.FixedSizeListArray.from_arrays(flat, dim),
    ], schema=feature_schema(dim))
    return table.replace_schema_metadata({META_KEY: meta.to_bytes()})


@dataclass
class SlideFeatures:
    """A slide's features in memory: coordinates (level-0 px), tissue fraction, features [n, dim] float32."""

    slide_id: str
    x: np.ndarray
    y: np.ndarray
    tissue_fraction: np.ndarray
    features: np.ndarray
    meta: FeatureFileMeta

    @property
    def coords(self) -> np.ndarray:
        return np.stack([self.x, self.y], axis=1)


def table_to_slide_features(table: pa.Table, source: str = "") -> SlideFeatures:
    missing = [c for c in ("slide_id", "x", "y", "tissue_fraction", "feature") if c not in table.column_names]
    if missing:
        raise FeatureStoreError(f"{source}: feature file lacks column(s) {missing}")
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise FeatureStoreError(f"{source}: feature file has no her2ray metadata")
    meta = FeatureFileMeta.from_bytes(raw, source)
    col = table.column("feature").combine_chunks()
    dim = col.type.list_size
    feats = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    return SlideFeatures(
        slide_id=meta.slide_id,
        x=table.column("x").to_numpy().astype(np.int64),
        y=table.column("y").to_numpy().astype(np.int64),
        tissue_fraction=table.column("tissue_fraction").to_numpy().astype(np.float32),
        features=feats,
        meta=meta,
    )


def feature_url(store: str, slide_id: str) -> str:
    return storage.join(store, FEATURES_DIR, f"{slide_id}.parquet")


def read_slide_features(url: str) -> SlideFeatures:
    """Read one feature file (local or URL) into memory."""
    try:
        table = storage.read_parquet(url)
    except FileNotFoundError:
        raise FeatureStoreError(f"{url}: feature file not found") from None
    return table_to_slide_features(table, source=url)


def feature_ids(store: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Slide ids with a committed feature file (one listing; temp files never end in .parquet)."""
    urls = storage.list_files(storage.join(store, FEATURES_DIR), suffix=".parquet",
                              storage_options=storage_options)
    names = (u.rstrip("/").rsplit("/", 1)[-1] for u in urls)
    return {n[: -len(".parquet")] for n in names if not n.startswith((".", "_"))}


def read_catalog(store: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table | None:
    """The store's slides.parquet (one row per manifest slide), or None when the store has none."""
    url = storage.join(store, CATALOG_FILE)
    if not storage.exists(url, storage_options):
        return None
    return storage.read_parquet(url, storage_options=storage_options)
