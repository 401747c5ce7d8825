"""Slide manifests (CSV or Parquet, local or any fsspec URL): loading and validation at the boundary.

Every problem is reported before any work starts, naming the file, the 1-based data row and the column.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import storage
from .errors import ManifestError

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]*$")
#: longest slide id (bytes): ids become file names ``<id>.parquet`` and temp names ``.<id>.parquet.<random>.tmp``,
#: which must stay within the 255-byte file-name limit of common filesystems (and S3 key limits)
MAX_ID_BYTES = 200


def read_table(url: str) -> pa.Table:
    """Read a CSV or Parquet table; all CSV columns are read as strings (no silent type guessing)."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise ManifestError("manifest not found", file=str(url)) from None
    if str(url).lower().endswith((".parquet", ".pq")):
        return pq.read_table(io.BytesIO(data))
    check_csv_text(data, str(url))
    try:
        header = pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(skip_rows_after_names=10**9))
        names = header.column_names
        return pacsv.read_csv(
            io.BytesIO(data),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"not a readable CSV: {exc}", file=str(url)) from None


def check_csv_text(data: bytes, url: str) -> None:
    """A CSV must be UTF-8 and have data rows; otherwise a ``ManifestError`` naming the first bad row."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1             # 1-based line; the header is line 1
        raise ManifestError(f"not UTF-8 text (byte {data[exc.start:exc.start + 1]!r} at line {line}); save the "
                            "manifest as UTF-8", file=url, row=max(1, line - 1) if line > 1 else None) from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ManifestError("manifest is empty (no header, no rows)", file=url)
    if len(lines) == 1:
        raise ManifestError(f"manifest has a header ({lines[0].strip()[:120]}) but no rows", file=url)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value.strip() == "")


def validate_slide_id(value: Any, *, file: str, row: int, column: str = "slide_id") -> str:
    """Slide ids become file names: no separators, no '..', no leading dot, no spaces."""
    if _is_missing(value):
        raise ManifestError("empty slide id", file=file, row=row, column=column)
    sid = str(value).strip()
    if len(sid.encode("utf-8")) > MAX_ID_BYTES:
        raise ManifestError(f"slide id is {len(sid.encode('utf-8'))} bytes long (at most {MAX_ID_BYTES}: ids become "
                            f"file names): {sid[:40]}...", file=file, row=row, column=column)
    if not SAFE_ID.match(sid) or ".." in sid:
        raise ManifestError(
            f"unsafe slide id {sid!r}: ids become file names, use letters, digits, '.', '_', '+', '-' "
            "(no path separators, no '..', no leading dot)", file=file, row=row, column=column)
    return sid


def load_manifest(url: str, required: Iterable[str] = ("slide_id", "path"),
                  optional_float: Iterable[str] = ("mpp",)) -> list[dict[str, Any]]:
    """Rows of a slide manifest as dicts, validated: required columns, safe unique ids, non-empty paths.

    ``mpp`` (when present and non-empty) must be a positive number. Other columns are carried as given.
    """
    url = str(url)
    table = read_table(url)
    columns = table.column_names
    missing = [c for c in required if c not in columns]
    if missing:
        raise ManifestError(f"missing required column(s) {missing}; found {columns}", file=url)
    rows = table.to_pylist()
    if not rows:
        raise ManifestError("manifest has no rows", file=url)
    seen: dict[str, int] = {}
    out = []
    for i, row in enumerate(rows, start=1):
        row = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
        if "slide_id" in required or "slide_id" in row:
            sid = validate_slide_id(row.get("slide_id"), file=url, row=i)
            if sid in seen:
                raise ManifestError(f"duplicate slide id {sid!r} (first seen in row {seen[sid]})",
                                    file=url, row=i, column="slide_id")
            seen[sid] = i
            row["slide_id"] = sid
        if "path" in required and _is_missing(row.get("path")):
            raise ManifestError("empty path", file=url, row=i, column="path")
        for col in optional_float:
            if col in row:
                if _is_missing(row[col]):
                    row[col] = None
                    continue
                try:
                    val = float(row[col])
                except (TypeError, ValueError):
                    raise ManifestError(f"{col} must be a number, got {row[col]!r}", file=url, row=i,
                                        column=col) from None
                if not (val > 0 and math.isfinite(val)):
                    raise ManifestError(f"{col} must be positive, got {row[col]!r}", file=url, row=i,
                                        column=col)
                row[col] = val
        out.append(row)
    return out
