"""The pipelined engine's pieces put together without Ray: reader chunks -> encode loop -> assembler.

``encode_chunk`` is what the Ray encoder actor runs on each batch (rows of any slides); ``embed_rows_local``
runs the whole engine in one process (tests, benchmarks on a box without Ray, a single slide), with exactly
the same code as the cluster, so a slide's features do not depend on where it was embedded.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from ..encoders.device_loop import EncodeLoop
from .assemble import SlideAssembler
from .embed import EmbedConfig
from .reading import KIND_ERROR, plan_slide, read_unit

ENGINE_NAME = "pipelined"


def provenance(precision: str, device_type: str, forward_rows: int) -> dict[str, Any]:
    """What each feature file records about how its features were computed (not part of the resume key)."""
    from ..encoders.device_loop import decoder_name

    return {"engine": ENGINE_NAME, "precision": precision, "device": device_type,
            "decoder": decoder_name(device_type), "forward_rows": int(forward_rows)}


def encoder_provenance(loop: EncodeLoop) -> dict[str, Any]:
    from .embed import _torch_threads

    return {**provenance(loop.encoder.precision, loop.device.type, loop.rows),
            "torch_threads": _torch_threads(loop.device)}


OUT_COLUMNS = ("slide_id", "tile_index", "n_tiles", "x", "y", "tissue_fraction", "kind", "info", "read_s")


def encode_chunks(loop: EncodeLoop, chunks: Sequence[Mapping[str, Any]], tile_px: int) -> dict[str, Any]:
    """``encode_chunk`` over several reader chunks at once: their tiles fill forwards together, so the short
    tails of several read units share forwards (fixed shapes keep each tile's features independent of that)."""
    if len(chunks) == 1:
        return encode_chunk(loop, chunks[0], tile_px)
    cols = {k: np.concatenate([np.asarray(c[k], dtype=object if k in ("slide_id", "kind", "info") else None)
                               for c in chunks]) for k in OUT_COLUMNS + ("src_px", "jpeg_k", "rgb_coded")}
    cols["payload"] = [p for c in chunks for p in c["payload"]]
    return encode_chunk(loop, cols, tile_px)


def encode_chunk(loop: EncodeLoop, cols: Mapping[str, Any], tile_px: int) -> dict[str, Any]:
    """Encoder output for a batch of reader rows: the rows' metadata + ``feature`` float16 [n, dim] + the
    encoder seconds spent per row (``encode_s``); error rows pass through with zero features."""
    t0 = time.perf_counter()
    kinds = np.asarray(cols["kind"]).astype(str)
    n = len(kinds)
    feats = np.zeros((n, loop.encoder.dim), np.float16)
    ok = np.flatnonzero(kinds != KIND_ERROR)
    if len(ok):
        payload = cols["payload"]
        feats[ok] = loop.encode_rows(kinds[ok], [payload[i] for i in ok], np.asarray(cols["src_px"])[ok],
                                     np.asarray(cols["jpeg_k"])[ok], np.asarray(cols["rgb_coded"])[ok], tile_px)
    out = {k: cols[k] for k in OUT_COLUMNS}
    out["feature"] = feats
    out["encode_s"] = np.full(n, (time.perf_counter() - t0) / max(1, n))
    return out


def embed_rows_local(rows: Sequence[Mapping[str, Any]], loop: EncodeLoop, cfg: EmbedConfig, out_store: str, *,
                     transport: str = "auto", chunk_tiles: int | None = None) -> list[dict[str, Any]]:
    """Embed manifest rows in this process with the pipelined engine; one status row per slide."""
    from .embed import STATUS_FAILED, status_row

    enc = loop.encoder
    assembler = SlideAssembler(rows, out_store, cfg, enc.settings_identity(), encoder_provenance(loop))
    statuses: list[dict[str, Any]] = []
    chunk = int(chunk_tiles or loop.rows)
    for row in rows:
        for unit in plan_slide(row, cfg, transport=transport, device_type=loop.device.type):
            for cols in read_unit(unit, cfg, chunk_tiles=chunk):
                assembler.add(encode_chunk(loop, cols, cfg.tiling.tile_px))
        statuses.extend(assembler.poll())
    statuses.extend(assembler.finish())
    seen = {s["slide_id"] for s in statuses}
    statuses.extend(status_row(r, STATUS_FAILED, error="no tiles were produced") for r in rows
                    if str(r["slide_id"]) not in seen)
    by_id = {s["slide_id"]: s for s in statuses}
    return [by_id[str(r["slide_id"])] for r in rows]
