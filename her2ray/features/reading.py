"""Reader side of the pipelined engine (no Ray here): slide -> plan -> read units -> chunks of tile rows.

``plan_slide`` opens a slide, plans its tissue tiles and decides how its tiles travel to the encoder:

* ``jpeg``: the compressed file tiles under each grid tile (``tiling.jpeg_payload``), decoded, assembled and
  downscaled on the encoder's device: the CPU only ``pread``s. Used when every tile lines up with the file's
  JPEG tiles and the transport setting allows it;
* ``scaled``: tiles whose read level is exactly 2x (4x, 8x) finer than the target are decoded by the reader
  at 1/2 (1/4, 1/8) in the DCT domain (``tiling.scaled_read``): pixels arrive at ``tile_px``, with no
  full-size decode and no resize anywhere. The first choice for 40x slides;
* ``rgb``: decoded pixels at the read level (OpenSlide or the direct TIFF decoder), ``read_px`` square; when
  the read level is finer than the target the downscale still happens on the device, not on the CPU. Tiles
  that need upsampling (a slide coarser than the target) and stain-normalised tiles are finished on the CPU
  exactly as the reference engine does (``tiling.read``), so they arrive at ``tile_px``.

The plan is cut into read units of at most ``unit_tiles`` tiles, each read by its own task (several tasks
per big slide, many slides ahead of the encoder). ``read_unit`` yields chunks (dicts of equal-length
columns, ``CHUNK_COLUMNS``) of at most ``chunk_tiles`` rows; the Ray stage ships each chunk as ONE row
(``pack_chunk``) so that Ray Data's block splitting and merging never cut a chunk: with chunks of exactly one
forward (``chunk_tiles`` = the encoder's forward rows), only read units' last chunks leave forwards short.
Any failure becomes one ``error`` row naming the slide, so the assembler records the slide as failed and the
cohort goes on.
"""

from __future__ import annotations

import json
import pickle
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import SlideError
from ..slides.tiff_tiles import scaled_decoder_name
from ..tiling import TileGrid
from ..tiling.jpeg_payload import JpegLayout, jpeg_layout, jpeg_payloads
from ..tiling.scaled_read import dct_scale, scaled_tiles
from .embed import EmbedConfig, _mpp_override, _mpp_provenance, _write_qc

TRANSPORTS = ("auto", "jpeg", "rgb", "scaled")
KIND_RGB, KIND_JPEG, KIND_ERROR = "rgb", "jpeg", "error"
SCALED = "scaled"
#: a chunk of raw pixels stays under this size: 1,024 tiles of 256 px (one GPU forward) fit, 512 px ones do not
CHUNK_BYTES = 256 * 1024**2
CHUNK_COLUMNS = ("slide_id", "tile_index", "n_tiles", "x", "y", "tissue_fraction", "kind", "src_px", "jpeg_k",
                 "rgb_coded", "payload", "info", "read_s")


@dataclass
class ReadUnit:
    """Tiles ``start .. start + len(grid)`` of one slide (``grid`` is that slice), or a planning failure."""

    row: dict
    n_tiles: int
    start: int = 0
    grid: TileGrid | None = None
    kind: str = KIND_RGB
    src_px: int = 0
    layout: JpegLayout | None = None
    scale: int = 1                     # > 1: decoded at 1/scale in the DCT domain (the ``scaled`` transport)
    info: dict | None = None           # slide provenance, carried by the unit holding tile 0
    error: str | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def from_bytes(raw: bytes) -> "ReadUnit":
        return pickle.loads(raw)


def _slide_cache(cfg: EmbedConfig):
    if not cfg.storage_options:
        return None
    from ..slides import SlideCache

    return SlideCache(storage_options=cfg.storage_options)


def _failure(row: Mapping[str, Any], exc: BaseException) -> str:
    if isinstance(exc, SlideError):
        return f"{type(exc).__name__}: {exc}"
    return f"unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}".strip()


def transport_preference(transport: str, device_type: str) -> tuple[str, ...]:
    """The payload routes to try, best first, for a ``--tile-transport`` on a device type.

    ``auto``: DCT-scaled reads first (the cheapest 40x route: ~1 ms of reader CPU per tile, no resize, a
    quarter of the bytes, and the GPU is left to the encoder instead of 4 nvJPEG decodes per tile), then
    compressed tiles where a GPU decodes them, then pixels."""
    if transport not in TRANSPORTS:
        raise ValueError(f"tile transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport == "auto":
        return (SCALED, KIND_JPEG, KIND_RGB) if device_type == "cuda" else (SCALED, KIND_RGB)
    return (transport, KIND_RGB) if transport != KIND_RGB else (KIND_RGB,)


def choose_kind(grid: TileGrid, layout: JpegLayout | None, scale: int | None, prefer: tuple[str, ...],
                stain: bool) -> tuple[str, int, int]:
    """(payload kind, payload tile px, DCT decode scale) for a slide (see the module docstring)."""
    if stain or grid.read_px < grid.tile_px:
        return KIND_RGB, int(grid.tile_px), 1              # finished on the CPU, like the reference
    for route in prefer:
        if route == SCALED and scale:
            return KIND_RGB, int(grid.tile_px), int(scale)
        if route == KIND_JPEG and layout is not None:
            return KIND_JPEG, int(grid.read_px), 1
    return KIND_RGB, int(grid.read_px), 1


def unit_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest fields a read unit carries: slide_id, path, mpp override (or None)."""
    return {"slide_id": str(row["slide_id"]), "path": str(row["path"]), "mpp": _mpp_override(row)}


def plan_slide(row: Mapping[str, Any], cfg: EmbedConfig, *, transport: str = "auto", device_type: str = "cpu",
               unit_tiles: int = 4096) -> list[ReadUnit]:
    """Open + plan one manifest row; the read units of its tiles (one failed unit when that fails)."""
    from ..slides import open_slide
    from ..tiling import plan_tiles
    from ..watchdog import beat

    t0 = time.perf_counter()
    row = unit_row(row)
    try:
        beat("opening slide")
        with open_slide(row["path"], mpp_override=row["mpp"], backend=cfg.slide_backend,
                        cache=_slide_cache(cfg), mpp_from_magnification=cfg.mpp_from_magnification) as reader:
            beat("planning tissue tiles")
            grid = plan_tiles(reader, cfg.tiling, keep_mask=cfg.qc_dir is not None)
            layout = jpeg_layout(reader, grid)
            scale = dct_scale(reader, grid)
            mpp_info = _mpp_provenance(reader, row["slide_id"])
            if cfg.qc_dir:                                  # the slide's QC picture, drawn where it is planned
                _write_qc(reader, grid, cfg, row["slide_id"])
                grid.mask = None
        kind, src_px, scale = choose_kind(grid, layout, scale, transport_preference(transport, device_type),
                                          cfg.stain_normalization is not None)
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop a cohort; the reason is kept
        return [ReadUnit(row=row, n_tiles=0, error=_failure(row, exc), seconds=time.perf_counter() - t0)]
    seconds = time.perf_counter() - t0
    info = {"grid": grid.metadata(), "slide_mpp": float(grid.slide_mpp), "level": int(grid.level),
            "tile_size_level0_px": float(grid.tile_size_level0_px), "tile_px": int(grid.tile_px),
            "target_mpp": float(grid.target_mpp),
            "mpp": mpp_info,
            "transport": {"kind": kind, "payload_px": src_px,
                          "jpeg_layout": None if kind != KIND_JPEG else layout.to_dict(),
                          "downscale": (f"dct-1/{scale}" if scale > 1 else
                                        "device-box" if src_px > grid.tile_px else "none"),
                          "reader_decoder": scaled_decoder_name() if scale > 1 else None},
            "plan_s": round(seconds, 4)}
    n = len(grid)
    units = []
    for s in range(0, n, max(1, int(unit_tiles))):
        part = grid.subset(np.arange(s, min(n, s + unit_tiles)))
        units.append(ReadUnit(row=row, n_tiles=n, start=s, grid=part, kind=kind, src_px=src_px,
                              layout=layout if kind == KIND_JPEG else None, scale=scale,
                              info=info if s == 0 else None,
                              seconds=seconds if s == 0 else 0.0))
    return units


def error_chunk(slide_id: str, message: str) -> dict[str, Any]:
    return {"slide_id": [slide_id], "tile_index": np.array([-1], np.int64), "n_tiles": np.array([0], np.int64),
            "x": np.array([0], np.int64), "y": np.array([0], np.int64),
            "tissue_fraction": np.array([0], np.float32), "kind": [KIND_ERROR], "src_px": np.array([0], np.int32),
            "jpeg_k": np.array([0], np.int32), "rgb_coded": np.array([False]), "payload": [b""],
            "info": [message], "read_s": np.array([0.0])}


def pack_chunk(cols: Mapping[str, Any]) -> dict[str, list]:
    """One Ray Data row holding a whole chunk (see the module docstring)."""
    return {"slide_id": [str(cols["slide_id"][0])], "tiles": [len(cols["kind"])],
            "chunk": [pickle.dumps(dict(cols), protocol=pickle.HIGHEST_PROTOCOL)]}


def unpack_chunks(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a batch of ``pack_chunk`` rows, in order."""
    return [pickle.loads(raw) for raw in batch["chunk"]]


def read_unit(unit: ReadUnit, cfg: EmbedConfig, *, chunk_tiles: int = 256) -> Iterator[dict[str, Any]]:
    """Chunks of tile rows of one read unit (``CHUNK_COLUMNS``); a failure ends it with an error row."""
    from ..slides import open_slide
    from ..tiling import read_tiles

    sid = unit.row["slide_id"]
    if unit.error is not None:
        yield error_chunk(sid, unit.error)
        return
    grid = unit.grid
    if unit.kind == KIND_RGB:
        chunk_tiles = min(int(chunk_tiles), max(8, CHUNK_BYTES // (3 * unit.src_px ** 2)))
    try:
        normalizer = cfg.stain_normalizer()
        with open_slide(unit.row["path"], mpp_override=unit.row["mpp"], backend=cfg.slide_backend,
                        cache=_slide_cache(cfg), mpp_from_magnification=cfg.mpp_from_magnification) as reader:
            for s in range(0, len(grid), max(1, int(chunk_tiles))):
                t0 = time.perf_counter()
                idx = np.arange(s, min(len(grid), s + chunk_tiles))
                if unit.kind == KIND_JPEG:
                    payload = jpeg_payloads(reader, grid, unit.layout, idx)
                elif unit.scale > 1:
                    payload = [t.tobytes() for t in scaled_tiles(reader, grid, unit.scale, idx)]
                else:
                    tiles = read_tiles(reader, grid, idx, num_workers=1, resize=unit.src_px == grid.tile_px)
                    if normalizer is not None:
                        tiles = normalizer(tiles)
                    payload = [t.tobytes() for t in tiles]
                m = len(idx)
                info = [""] * m
                if s == 0 and unit.info is not None:
                    info[0] = json.dumps(unit.info, sort_keys=True)
                yield {"slide_id": [sid] * m, "tile_index": (unit.start + idx).astype(np.int64),
                       "n_tiles": np.full(m, unit.n_tiles, np.int64), "x": grid.x[idx].astype(np.int64),
                       "y": grid.y[idx].astype(np.int64), "tissue_fraction": grid.tissue_fraction[idx].astype(np.float32),
                       "kind": [unit.kind] * m, "src_px": np.full(m, unit.src_px, np.int32),
                       "jpeg_k": np.full(m, unit.layout.k if unit.layout else 0, np.int32),
                       "rgb_coded": np.full(m, bool(unit.layout and unit.layout.rgb_coded)),
                       "payload": payload, "info": info,
                       "read_s": np.r_[time.perf_counter() - t0 + (unit.seconds if s == 0 else 0.0),
                                       np.zeros(m - 1)]}
    except Exception as exc:  # noqa: BLE001 - reported as the slide's failure
        yield error_chunk(sid, _failure(unit.row, exc))
