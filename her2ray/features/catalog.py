"""The slide catalog (``<store>/slides.parquet``) and the resume rules of ``her2ray embed``.

Why the feature files, not the catalog, decide what is done: a run can be killed at any point, and the
only thing guaranteed to be complete is a feature file (it is committed atomically). So a rerun lists
``features/`` once, reads the footer metadata of the files present (threaded; a footer is a few KB), and
skips a slide only when its file was made with the same ``resume_key`` (encoder identity + tiling
settings) and, when the manifest gives an MPP override, the same slide MPP. Everything else is (re)done.
The catalog written at the end has one row per manifest slide, in manifest order:

``slide_id, path, status (ok | failed | skipped), error, n_tiles, mpp, level, seconds, read_wait_s,
encode_s`` + the other manifest columns (a manifest column whose name clashes gets a ``manifest_`` prefix).
``skipped`` = a valid feature file from an earlier run was kept: its features are usable like ``ok``.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pyarrow as pa

from .. import storage
from ..errors import FeatureStoreError
from .embed import STATUS_SKIPPED, meta_resume_key
from .schema import (CATALOG_FILE, FEATURES_DIR, META_KEY, USABLE_STATUSES, FeatureFileMeta,  # noqa: F401
                     feature_ids, feature_url, is_usable, read_catalog)

log = logging.getLogger(__name__)

CATALOG_SCHEMA = pa.schema([
    ("slide_id", pa.string()),
    ("path", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("n_tiles", pa.int64()),
    ("mpp", pa.float64()),
    ("level", pa.int32()),
    ("seconds", pa.float64()),
    ("read_wait_s", pa.float64()),
    ("encode_s", pa.float64()),
])
STATUS_COLUMNS = tuple(CATALOG_SCHEMA.names)


@dataclass
class ResumePlan:
    """Which manifest rows to embed now, and the status rows of those kept from earlier runs."""

    todo: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)        # had a file made with other settings: redone


def read_file_meta(url: str, storage_options: Mapping[str, Any] | None = None
                   ) -> tuple[FeatureFileMeta | None, int]:
    """(metadata, row count) from a feature file's footer; (None, 0) if it is not a valid her2ray file."""
    import pyarrow.parquet as pq

    try:
        fs, path = storage.filesystem_for(url, storage_options)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
            n = pf.metadata.num_rows
        if raw is None:
            return None, 0
        return FeatureFileMeta.from_bytes(raw, url), int(n)
    except (OSError, ValueError, FeatureStoreError, pa.ArrowException) as exc:
        log.warning("%s: unreadable feature file, will be recomputed (%s)", url, exc)
        return None, 0


def plan_resume(rows: Sequence[Mapping[str, Any]], store: str, key: Mapping[str, Any], *,
                overwrite: bool = False, storage_options: Mapping[str, Any] | None = None,
                max_workers: int = 16) -> ResumePlan:
    """Split manifest rows into todo and skipped (see the module docstring for the rule)."""
    rows = [dict(r) for r in rows]
    if overwrite:
        return ResumePlan(todo=rows)
    present = feature_ids(store, storage_options)
    candidates = [r for r in rows if r["slide_id"] in present]
    if not candidates:
        return ResumePlan(todo=rows)
    want = json.dumps(key, sort_keys=True, default=str)
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(candidates)))) as pool:
        metas = dict(zip((r["slide_id"] for r in candidates),
                         pool.map(lambda r: read_file_meta(feature_url(store, r["slide_id"]), storage_options),
                                  candidates)))
    plan = ResumePlan(todo=[])
    for r in rows:
        sid = r["slide_id"]
        meta, n = metas.get(sid, (None, 0))
        if meta is not None and _reusable(meta, n, r, want):
            plan.skipped.append({
                "slide_id": sid, "path": str(r.get("path", "")), "status": STATUS_SKIPPED, "error": None,
                "n_tiles": n, "mpp": meta.slide_mpp, "level": meta.level, "seconds": 0.0,
                "read_wait_s": 0.0, "encode_s": 0.0})
        else:
            if sid in present:
                plan.stale.append(sid)
            plan.todo.append(r)
    return plan


def _reusable(meta: FeatureFileMeta, n_rows: int, row: Mapping[str, Any], want: str) -> bool:
    if n_rows <= 0 or meta.slide_id != row["slide_id"]:
        return False
    if json.dumps(meta_resume_key(meta), sort_keys=True, default=str) != want:
        return False
    override = row.get("mpp")
    if override not in (None, "") and abs(float(override) - float(meta.slide_mpp)) > 1e-9 * float(override):
        return False                                   # the manifest's MPP changed since: tiles differ
    return True


def build_catalog(manifest_rows: Sequence[Mapping[str, Any]], status_rows: Sequence[Mapping[str, Any]]
                  ) -> pa.Table:
    """One row per manifest slide (manifest order): status columns + carried manifest columns."""
    by_id = {str(s["slide_id"]): s for s in status_rows}
    missing = [str(r["slide_id"]) for r in manifest_rows if str(r["slide_id"]) not in by_id]
    if missing:
        raise FeatureStoreError(f"internal error: no status for slide(s) {missing[:5]}")
    columns: dict[str, list] = {name: [] for name in STATUS_COLUMNS}
    extra_names = [c for c in dict.fromkeys(k for r in manifest_rows for k in r) if c not in ("slide_id", "path")]
    carried = {c: (f"manifest_{c}" if c in STATUS_COLUMNS else c) for c in extra_names}
    extras: dict[str, list] = {out: [] for out in carried.values()}
    for r in manifest_rows:
        s = by_id[str(r["slide_id"])]
        for name in STATUS_COLUMNS:
            columns[name].append(s.get(name))
        for src, out in carried.items():
            extras[out].append(r.get(src))
    arrays = [pa.array(columns[f.name], type=f.type) for f in CATALOG_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=CATALOG_SCHEMA)
    for out, values in extras.items():
        table = table.append_column(out, _carried_array(values))
    return table


def _carried_array(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):            # mixed types: keep them as text
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def write_catalog(store: str, table: pa.Table, storage_options: Mapping[str, Any] | None = None) -> str:
    """Commit ``table`` as the store's catalog, keeping the rows of slides from earlier runs on this store that
    this run's manifest does not list (two runs with disjoint manifests leave both halves in the catalog).
    Callers hold the store lease, so this read-modify-write cannot race another embed run."""
    url = storage.join(store, CATALOG_FILE)
    storage.write_parquet_atomic(keep_other_slides(table, read_catalog(store, storage_options)), url,
                                 storage_options)
    return url


def keep_other_slides(table: pa.Table, previous: pa.Table | None) -> pa.Table:
    """``table`` + the rows of ``previous`` whose slide ids ``table`` does not have (after them)."""
    if previous is None or previous.num_rows == 0 or "slide_id" not in previous.column_names:
        return table
    import pyarrow.compute as pc

    mine = pa.array(table.column("slide_id").to_pylist(), pa.string())
    others = previous.filter(pc.invert(pc.is_in(previous.column("slide_id").cast(pa.string()), value_set=mine)))
    if others.num_rows == 0:
        return table
    try:
        return pa.concat_tables([table, others], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):        # carried columns of other types: keep them as text
        def as_text(t: pa.Table) -> pa.Table:
            return pa.table({n: (t.column(n) if n in STATUS_COLUMNS else t.column(n).cast(pa.string()))
                             for n in t.column_names})
        return pa.concat_tables([as_text(table), as_text(others)], promote_options="permissive")


def remove_stray_temp_files(store: str, min_age_s: float = 0.0) -> int:
    """Delete temp files a killed local run left in ``features/`` (``.<name>.parquet.*.tmp``).

    They are invisible to readers already (hidden names, no .parquet suffix); this only reclaims space.
    Object stores never have them (a PUT is atomic). Called under the store lease, and only for files not
    modified for ``min_age_s`` (the lease ttl), so another live run's in-flight temp file is never touched.
    """
    import time

    cutoff = time.time() - float(min_age_s)
    if not storage.is_local(store):
        return 0
    folder = os.path.join(storage.local_path(store), FEATURES_DIR)
    if not os.path.isdir(folder):
        return 0
    removed = 0
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp") and ".parquet." in name:
            try:
                path = os.path.join(folder, name)
                if os.stat(path).st_mtime <= cutoff:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                pass
    if removed:
        log.info("removed %d stray temp file(s) left by an interrupted run in %s", removed, folder)
    return removed
