"""Merge per-center manifests into one validated cohort manifest.

Each center spells things its own way (column names, "HER2 2+" vs "2", ISH columns); everything is
mapped onto the unified columns here, at the boundary, so downstream stages see one schema. Every
problem names the center, its manifest file, the 1-based data row and the source column.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from .. import storage
from ..errors import ManifestError
from ..labels import parse_her2_score, score_name
from ..manifest import read_table, validate_slide_id
from .config import CenterConfig, MergeConfig
from .duplicates import FileInfo, content_groups, stat_files

log = logging.getLogger(__name__)

#: Unified columns, in output order; extra (unmapped) source columns follow.
CORE_COLUMNS = ("slide_id", "path", "patient_id", "center", "her2_score", "her2_status", "her2_low", "ish",
                "mpp", "scanner", "source_slide_id", "source_file", "source_row", "file_size", "content_id")
_TYPES = {"her2_low": pa.bool_(), "mpp": pa.float64(), "source_row": pa.int64(), "file_size": pa.int64()}
MAX_LISTED = 20


@dataclass
class MergeResult:
    """The unified rows plus everything worth telling the user about how they were obtained."""

    rows: list[dict[str, Any]]
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    patient_overlap: list[dict[str, Any]] = field(default_factory=list)
    missing_files: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        extra: dict[str, None] = {}
        for r in self.rows:
            for k in r:
                if k not in CORE_COLUMNS:
                    extra[k] = None
        return list(CORE_COLUMNS) + list(extra)

    def to_table(self) -> pa.Table:
        cols = self.columns
        arrays = {c: pa.array([r.get(c) for r in self.rows], type=_TYPES.get(c, pa.string())) for c in cols}
        return pa.table(arrays)

    def report(self) -> dict[str, Any]:
        centers: dict[str, int] = {}
        for r in self.rows:
            centers[r["center"]] = centers.get(r["center"], 0) + 1
        return {"n_slides": len(self.rows), "slides_per_center": centers,
                "duplicates": self.duplicates, "patient_overlap": self.patient_overlap,
                "missing_files": self.missing_files, "warnings": self.warnings}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _text(v: Any) -> str | None:
    return None if _missing(v) else str(v).strip()


def _as_float(v: str) -> float | None:
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def _resolve_path(path: str, center: CenterConfig) -> str:
    """Relative slide paths are relative to ``path_base`` or else to the manifest's own folder."""
    if "://" in path or os.path.isabs(path):
        return path
    base = center.path_base
    if base is None:
        man = center.manifest
        base = posixpath.dirname(man) if not storage.is_local(man) else os.path.dirname(
            os.path.abspath(storage.local_path(man)))
    return storage.join(base, path)


def _parse_label(raw: Any, center: CenterConfig, row: int, column: str) -> int:
    key = str(raw).strip().lower()
    value = center.label_map.get(key, raw)
    try:
        return parse_her2_score(value)
    except ValueError:
        raise ManifestError(
            f"center {center.name}: unrecognised HER2 IHC score {raw!r} (accepted: 0, 1+, 2+, 3+ and "
            "spellings like 'HER2 2+', 'IHC 2+', '2'; map other spellings with label_map)",
            file=center.manifest, row=row, column=column) from None


def _her2_status(score: int | None, ish_value: str | None, center: CenterConfig, row: int
                 ) -> tuple[str | None, bool | None]:
    """(her2_status, her2_low) from IHC and, for 2+, ISH (ASCO/CAP: 3+ or 2+/ISH-amplified = positive).

    An IHC 2+ without an ISH result stays unknown (None) rather than being called negative.
    """
    if score is None:
        return None, None
    amplified = None
    if center.ish is not None and ish_value is not None:
        v = ish_value.strip().lower()
        ratio = _as_float(v) if center.ish.ratio_threshold is not None else None
        if ratio is not None:
            amplified = ratio >= center.ish.ratio_threshold
        elif v in center.ish.positive:
            amplified = True
        elif center.ish.negative is None or v in center.ish.negative:
            amplified = False
        else:
            raise ManifestError(
                f"center {center.name}: ISH value {ish_value!r} is neither positive {center.ish.positive} "
                f"nor negative {center.ish.negative}", file=center.manifest, row=row, column=center.ish.column)
    if score == 3:
        return "positive", False
    if score == 2:
        if amplified is None:
            return None, None
        return ("positive", False) if amplified else ("negative", True)
    return "negative", score == 1


def load_center(center: CenterConfig, cfg: MergeConfig) -> list[dict[str, Any]]:
    """One center's rows in unified form (labels parsed, ids prefixed, paths resolved), unchecked files."""
    url = center.manifest
    table = read_table(url)
    columns = table.column_names
    unknown = [c for c in center.columns if c not in columns]
    if unknown:
        raise ManifestError(f"center {center.name}: mapped column(s) {unknown} not in the manifest; found "
                            f"{columns}", file=url)
    rename = {c: center.columns.get(c, c) for c in columns}
    source_of = {v: k for k, v in rename.items()}
    for req in ("slide_id", "path") + (("her2_score",) if cfg.require_labels else ()):
        if req not in source_of:
            raise ManifestError(f"center {center.name}: no column maps to {req!r}; found {columns} (set "
                                f"'columns' for this center)", file=url)
    if center.ish is not None and center.ish.column not in columns:
        raise ManifestError(f"center {center.name}: ISH column {center.ish.column!r} not in the manifest; "
                            f"found {columns}", file=url)
    prefix = center.slide_id_prefix if center.slide_id_prefix is not None else (
        f"{center.name}_" if cfg.prefix_slide_ids else "")
    ish_col = rename[center.ish.column] if center.ish is not None else "ish"
    rows = []
    for i, raw in enumerate(table.to_pylist(), start=1):
        src = {rename[k]: v for k, v in raw.items()}
        sid = validate_slide_id(src.get("slide_id"), file=url, row=i, column=source_of["slide_id"])
        new_id = validate_slide_id(prefix + sid, file=url, row=i, column=source_of["slide_id"])
        path = _text(src.get("path"))
        if path is None:
            raise ManifestError(f"center {center.name}: empty slide path", file=url, row=i,
                                column=source_of["path"])
        score = None
        if "her2_score" in src and not _missing(src["her2_score"]):
            score = _parse_label(src["her2_score"], center, i, source_of["her2_score"])
        elif cfg.require_labels:
            raise ManifestError(f"center {center.name}: empty HER2 score (set require_labels: false for "
                                "unlabelled cohorts)", file=url, row=i, column=source_of["her2_score"])
        ish = _text(raw.get(center.ish.column)) if center.ish is not None else _text(src.get("ish"))
        status, low = _her2_status(score, ish, center, i)
        mpp = None
        if not _missing(src.get("mpp")):
            try:
                mpp = float(src["mpp"])
            except (TypeError, ValueError):
                mpp = float("nan")
            if not (math.isfinite(mpp) and mpp > 0):
                raise ManifestError(f"center {center.name}: mpp must be a positive number, got {src['mpp']!r}",
                                    file=url, row=i, column=source_of["mpp"])
        row: dict[str, Any] = {
            "slide_id": new_id, "path": _resolve_path(path, center), "patient_id": _text(src.get("patient_id")),
            "center": center.name, "her2_score": None if score is None else score_name(score),
            "her2_status": status, "her2_low": low, "ish": ish, "mpp": mpp, "scanner": _text(src.get("scanner")),
            "source_slide_id": sid, "source_file": url, "source_row": i, "file_size": None, "content_id": None,
        }
        if cfg.keep_extra_columns:
            for k, v in src.items():
                if k not in row and k != ish_col:
                    row[k] = None if _missing(v) else str(v)
        rows.append(row)
    if not rows:
        raise ManifestError(f"center {center.name}: manifest has no rows", file=url)
    return rows


def _where(r: dict[str, Any]) -> str:
    return (f"center {r['center']}, file {r['source_file']}, row {r['source_row']} "
            f"(slide {r['source_slide_id']!r}, HER2 {r['her2_score'] or 'unlabelled'}"
            + (f", status {r['her2_status']}" if r.get("her2_status") else "") + ")")


def _same_label(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["her2_score"] != b["her2_score"]:
        return False
    return a["her2_status"] is None or b["her2_status"] is None or a["her2_status"] == b["her2_status"]


def resolve_duplicates(rows: list[dict[str, Any]], groups: dict[str, str] | None
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drop exact duplicates (same content or same id+path, same label); raise on conflicts/collisions.

    Returns (kept rows, duplicate report rows). Rows earlier in the list (earlier centers) win.
    """
    groups = groups or {}
    conflicts: list[str] = []
    dropped: set[int] = set()
    report: list[dict[str, Any]] = []
    first_by_content: dict[str, int] = {}
    first_by_id: dict[str, int] = {}

    def drop(keep: int, other: int, reason: str) -> None:
        dropped.add(other)
        k, o = rows[keep], rows[other]
        report.append({"reason": reason, "kept_slide_id": k["slide_id"], "kept_center": k["center"],
                       "kept_file": k["source_file"], "kept_row": k["source_row"], "kept_path": k["path"],
                       "dropped_slide_id": o["slide_id"], "dropped_center": o["center"],
                       "dropped_file": o["source_file"], "dropped_row": o["source_row"], "dropped_path": o["path"],
                       "her2_score": k["her2_score"]})

    for idx, r in enumerate(rows):
        key = groups.get(r["path"]) or f"path:{r['path']}"   # unchecked/missing files: same path only
        if key in first_by_content:
            first = first_by_content[key]
            if _same_label(rows[first], r):
                drop(first, idx, "same file content" if rows[first]["path"] != r["path"] else "same path")
            else:
                conflicts.append(f"same slide file content ({r['path']} == {rows[first]['path']}) with "
                                 f"different labels: {_where(rows[first])} vs {_where(r)}")
                dropped.add(idx)
            continue
        first_by_content[key] = idx
    for idx, r in enumerate(rows):
        if idx in dropped:
            continue
        sid = r["slide_id"]
        if sid not in first_by_id:
            first_by_id[sid] = idx
            continue
        first = rows[first_by_id[sid]]
        if not _same_label(first, r):
            conflicts.append(f"same slide id {sid!r} with different labels: {_where(first)} vs {_where(r)}")
        elif first["path"] == r["path"]:
            drop(first_by_id[sid], idx, "same path")
        else:
            conflicts.append(f"slide id {sid!r} used for two different files ({first['path']} and {r['path']}): "
                             f"{_where(first)} vs {_where(r)}; set slide_id_prefix or prefix_slide_ids: true")
        dropped.add(idx)
    if conflicts:
        more = f"\n  ... and {len(conflicts) - MAX_LISTED} more" if len(conflicts) > MAX_LISTED else ""
        raise ManifestError(f"{len(conflicts)} conflicting duplicate(s):\n  " +
                            "\n  ".join(conflicts[:MAX_LISTED]) + more)
    return [r for i, r in enumerate(rows) if i not in dropped], report


def patient_overlap(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Patients whose id appears under more than one center (a leak across center-wise splits, or an
    id clash between centers: either way a human should look)."""
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("patient_id"):
            by_patient.setdefault(r["patient_id"], []).append(r)
    out = []
    for pid, rs in sorted(by_patient.items()):
        centers = sorted({r["center"] for r in rs})
        if len(centers) > 1:
            out.append({"patient_id": pid, "centers": ";".join(centers), "n_slides": len(rs),
                        "slides": ";".join(r["slide_id"] for r in rs),
                        "sources": ";".join(f"{r['center']}:{r['source_file']}:row {r['source_row']}" for r in rs)})
    return out


def merge_cohorts(cfg: MergeConfig) -> MergeResult:
    """Load every center, check the slide files, resolve duplicates, report cross-center patients."""
    rows: list[dict[str, Any]] = []
    for center in cfg.centers:
        rows.extend(load_center(center, cfg))
    warnings: list[str] = []
    missing: list[dict[str, Any]] = []
    groups: dict[str, str] | None = None
    if cfg.check_files:
        infos: dict[str, FileInfo] = stat_files([r["path"] for r in rows], cfg.max_workers)
        for r in rows:
            info = infos[r["path"]]
            if info.exists:
                r["file_size"] = info.size
        groups = content_groups(infos, cfg.hash_mode, max_workers=min(4, cfg.max_workers))
        for r in rows:
            info = infos[r["path"]]
            r["content_id"] = info.content_id
            if not info.exists:
                missing.append({"slide_id": r["slide_id"], "center": r["center"], "path": r["path"],
                                "source_file": r["source_file"], "source_row": r["source_row"],
                                "error": info.error})
        if missing:
            lines = [f"{m['path']} ({m['error']}; center {m['center']}, file {m['source_file']}, row "
                     f"{m['source_row']})" for m in missing]
            text = f"{len(missing)} slide file(s) not found: " + "; ".join(lines[:MAX_LISTED]) + (
                " ..." if len(lines) > MAX_LISTED else "")
            if cfg.missing_files == "error":
                raise ManifestError(text + " (set missing_files: warn or drop to proceed)")
            warnings.append(text)
            if cfg.missing_files == "drop":
                gone = {(m["source_file"], m["source_row"]) for m in missing}
                rows = [r for r in rows if (r["source_file"], r["source_row"]) not in gone]
    rows, dupes = resolve_duplicates(rows, groups)
    if dupes:
        warnings.append(f"{len(dupes)} exact duplicate slide(s) with equal labels kept once (see duplicates)")
    overlap = patient_overlap(rows)
    if overlap:
        warnings.append(f"{len(overlap)} patient id(s) appear under more than one center (see patient_overlap): "
                        "the same patient in two centers leaks across center-wise splits")
    n_no_patient = sum(1 for r in rows if not r["patient_id"])
    if n_no_patient:
        warnings.append(f"{n_no_patient} slide(s) have no patient_id: patient-level splits will treat each "
                        "slide as its own patient")
    for w in warnings:
        log.warning(w)
    return MergeResult(rows=rows, duplicates=dupes, patient_overlap=overlap, missing_files=missing,
                       warnings=warnings)


def write_table(table: pa.Table, url: str) -> None:
    """CSV or Parquet by the URL's suffix, written atomically."""
    if str(url).lower().endswith((".parquet", ".pq")):
        storage.write_parquet_atomic(table, url)
        return
    if not str(url).lower().endswith(".csv"):
        raise ManifestError("output must end in .csv or .parquet", file=str(url))
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    storage.write_bytes_atomic(url, sink.getvalue().to_pybytes())


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Small report tables (duplicates, overlap) as Arrow, every value as given."""
    if not rows:
        return pa.table({})
    return pa.Table.from_pylist(rows)


__all__ = ["CORE_COLUMNS", "MergeResult", "load_center", "merge_cohorts", "patient_overlap",
           "resolve_duplicates", "rows_table", "write_table"]
