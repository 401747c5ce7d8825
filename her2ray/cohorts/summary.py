"""Per-center cohort summary: what each center contributed and how its slides differ technically.

Class balance, patients, MPP and scanner/vendor per center are the first things to look at before
trusting a multi-center model: a center with only 3+ slides, or the only one scanned at 0.25 um/px, is a
shortcut a model can learn instead of HER2. Written as CSV (machines), Markdown (humans) and PNG.
"""

from __future__ import annotations

import io
import logging
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import pyarrow as pa

from .. import storage
from ..errors import Her2RayError
from ..features.schema import CATALOG_FILE
from ..features.schema import read_catalog as read_catalog_table
from ..labels import HER2_SCORES, parse_her2_score
from ..slides import open_slide

log = logging.getLogger(__name__)

SCORE_COLUMNS = tuple(f"her2_{s}" for s in HER2_SCORES)   # her2_0, her2_1+, her2_2+, her2_3+
#: Slide properties naming the scanner model/serial, most specific first (OpenSlide property names).
SCANNER_PROPERTIES = ("aperio.ScanScope ID", "hamamatsu.Product", "leica.device-model", "philips.DICOM_MANUFACTURER",
                      "dicom.ManufacturerModelName", "ventana.ScannerModel", "mirax.GENERAL.SLIDE_TYPE",
                      "tiff.Model", "tiff.Make")


def scanner_from_properties(props: dict[str, str]) -> str | None:
    for key in SCANNER_PROPERTIES:
        if props.get(key):
            return str(props[key]).strip()
    return None


def read_slide_metadata(url: str) -> dict[str, Any]:
    """MPP, vendor and scanner of one slide; errors become an ``error`` entry, never an exception.

    Remote slides are staged locally by ``open_slide`` (a download); disable slide metadata for large
    remote cohorts when MPP/scanner are in the manifest or the feature catalog already.
    """
    try:
        reader = open_slide(url)
        try:
            props = {str(k): str(v) for k, v in dict(reader.properties).items()}
            try:
                mpp = reader.mpp
            except Her2RayError:
                mpp = None
            return {"mpp": float(mpp) if mpp else None, "vendor": props.get("openslide.vendor"),
                    "scanner": scanner_from_properties(props), "error": None}
        finally:
            reader.close()
    except Exception as exc:  # noqa: BLE001 - a summary must not die on one unreadable slide
        return {"mpp": None, "vendor": None, "scanner": None, "error": f"{type(exc).__name__}: {exc}"}


def read_catalog(features: str) -> dict[str, dict[str, Any]]:
    """slides.parquet of a feature store keyed by slide_id (n_tiles, mpp, status)."""
    table = read_catalog_table(features)
    if table is None:
        log.warning("no %s in %s: tiles per slide not summarised", CATALOG_FILE, features)
        return {}
    cols = [c for c in ("slide_id", "n_tiles", "mpp", "status") if c in table.column_names]
    return {r["slide_id"]: r for r in table.select(cols).to_pylist()}


def _distribution(values: Iterable[str | None]) -> str:
    counts = Counter(v for v in values if v)
    return ", ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _stats(values: list[float], prefix: str) -> dict[str, Any]:
    if not values:
        return {f"{prefix}_median": None, f"{prefix}_min": None, f"{prefix}_max": None}
    return {f"{prefix}_median": round(statistics.median(values), 4), f"{prefix}_min": round(min(values), 4),
            f"{prefix}_max": round(max(values), 4)}


def slide_level_metadata(rows: list[dict[str, Any]], features: str | None = None, slide_metadata: bool = True,
                         max_workers: int = 8) -> list[dict[str, Any]]:
    """Per slide: center, label, mpp/vendor/scanner (manifest > feature catalog > slide file), n_tiles."""
    catalog = read_catalog(features) if features else {}
    metas: dict[str, dict[str, Any]] = {}
    if slide_metadata and rows:
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(rows)))) as pool:
            metas = dict(zip((r["slide_id"] for r in rows), pool.map(read_slide_metadata, [r["path"] for r in rows])))
    out = []
    for r in rows:
        meta = metas.get(r["slide_id"], {})
        cat = catalog.get(r["slide_id"], {})
        mpp = r.get("mpp") or cat.get("mpp") or meta.get("mpp")
        try:
            score = None if r.get("her2_score") in (None, "") else parse_her2_score(r["her2_score"])
        except ValueError:
            score = None
        n_tiles = cat.get("n_tiles") if cat.get("status", "ok") == "ok" else None
        out.append({"slide_id": r["slide_id"], "center": r.get("center") or "(none)", "patient_id": r.get("patient_id"),
                    "score": score, "her2_status": r.get("her2_status"), "mpp": float(mpp) if mpp else None,
                    "vendor": meta.get("vendor"), "scanner": r.get("scanner") or meta.get("scanner"),
                    "n_tiles": int(n_tiles) if n_tiles is not None else None, "error": meta.get("error")})
    return out


def summarize(slides: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per center plus an ``ALL`` row."""
    centers = sorted({s["center"] for s in slides})
    out = []
    for name, subset in [(c, [s for s in slides if s["center"] == c]) for c in centers] + [("ALL", slides)]:
        scores = Counter(s["score"] for s in subset)
        row: dict[str, Any] = {"center": name, "slides": len(subset),
                               "patients": len({s["patient_id"] for s in subset if s["patient_id"]})}
        for i, col in enumerate(SCORE_COLUMNS):
            row[col] = scores.get(i, 0)
        row["unlabelled"] = scores.get(None, 0)
        row["her2_positive"] = sum(1 for s in subset if s["her2_status"] == "positive")
        row["her2_negative"] = sum(1 for s in subset if s["her2_status"] == "negative")
        row.update(_stats([s["mpp"] for s in subset if s["mpp"]], "mpp"))
        row["vendors"] = _distribution(s["vendor"] for s in subset)
        row["scanners"] = _distribution(s["scanner"] for s in subset)
        tiles = [s["n_tiles"] for s in subset if s["n_tiles"] is not None]
        row["slides_with_features"] = len(tiles)
        row.update(_stats([float(t) for t in tiles], "tiles"))
        row["unreadable_slides"] = sum(1 for s in subset if s["error"])
        out.append(row)
    return out


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    cols = list(summary[0].keys()) if summary else []

    def cell(v: Any) -> str:
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["# Cohort summary per center", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in summary]
    return "\n".join(lines) + "\n"


def summary_png(summary: list[dict[str, Any]], slides: list[dict[str, Any]]) -> bytes:
    """Left: HER2 class counts per center (stacked bars). Right: slide MPP per center (points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    per_center = [r for r in summary if r["center"] != "ALL"]
    names = [r["center"] for r in per_center]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names) + 5), 4.2))
    bottom = np.zeros(len(names))
    colors = ("#4c72b0", "#55a868", "#dd8452", "#c44e52", "#999999")
    for col, label, color in zip(SCORE_COLUMNS + ("unlabelled",), HER2_SCORES + ("unlabelled",), colors):
        vals = np.array([r[col] for r in per_center], dtype=float)
        if vals.sum() == 0 and col == "unlabelled":
            continue
        ax1.bar(names, vals, bottom=bottom, label=f"HER2 {label}" if col != "unlabelled" else label, color=color)
        bottom += vals
    ax1.set_ylabel("slides")
    ax1.set_title("HER2 IHC classes per center")
    ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        mpps = [s["mpp"] for s in slides if s["center"] == name and s["mpp"]]
        if mpps:
            ax2.scatter(i + rng.uniform(-0.15, 0.15, len(mpps)), mpps, s=14, alpha=0.7)
    ax2.set_xticks(range(len(names)), names)
    ax2.set_xlim(-0.6, len(names) - 0.4)
    ax2.set_ylabel("level-0 MPP (um/px)")
    ax2.set_title("Slide resolution per center")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_summary(rows: list[dict[str, Any]], out_dir: str, features: str | None = None,
                  slide_metadata: bool = True, max_workers: int = 8) -> dict[str, str]:
    """Write summary.csv, summary.md, summary.png (and slides_metadata.csv) under ``out_dir``."""
    from .merge import write_table

    slides = slide_level_metadata(rows, features, slide_metadata, max_workers)
    summary = summarize(slides)
    storage.makedirs(out_dir)
    paths = {"csv": storage.join(out_dir, "summary.csv"), "markdown": storage.join(out_dir, "summary.md"),
             "png": storage.join(out_dir, "summary.png"), "slides": storage.join(out_dir, "slides_metadata.csv")}
    write_table(pa.Table.from_pylist(summary), paths["csv"])
    write_table(pa.Table.from_pylist(slides), paths["slides"])
    storage.write_text_atomic(paths["markdown"], summary_markdown(summary))
    storage.write_bytes_atomic(paths["png"], summary_png(summary, slides))
    return paths
