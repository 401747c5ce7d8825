"""The embedding engine: one slide in, one feature file out. No Ray here.

Why a Ray-free engine: the same loop runs inside a Ray actor on a cluster, in a benchmark on a GPU box
without Ray, and in unit tests. Per slide it opens the slide (manifest MPP override wins), plans the tissue
tiles, reads tile batches in background threads while the encoder works on the previous batch, encodes,
and commits ``<store>/features/<slide_id>.parquet`` with one atomic write, so a reader (or a resumed run)
never sees a partial file. Anything that goes wrong with one slide (missing, corrupt, unsupported,
no MPP, no tissue, or an unexpected bug) becomes a ``failed`` status row with the reason, never an
exception that would take the cohort down.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any, Mapping

import numpy as np
from pydantic import Field, field_validator

from .. import storage
from ..watchdog import beat
from ..config import StageConfig
from ..errors import SlideError
from ..tiling import TilingConfig
from .schema import (STATUS_FAILED, STATUS_OK, STATUS_SKIPPED,  # noqa: F401 - re-exported for the catalog
                     FeatureFileMeta, build_feature_table, feature_url)

log = logging.getLogger(__name__)



class EmbedConfig(StageConfig):
    """What determines the features (encoder + tiling) and how one slide is processed.

    Cluster placement (actors, GPUs) is not here: it lives in the Ray layer and never changes results.
    """

    encoder: str = Field("plip", description="'plip', 'open_clip:<arch>' or 'open_clip' (see her2ray.encoders)")
    weights: str | None = Field(None, description="hub id (vinid/plip), local folder or file; None = random init")
    precision: str | None = Field(None, description="fp32 | bf16 | fp16 | bf16-pure | fp16-pure; None = auto")
    device: str | None = Field(None, description="cuda | cpu | cuda:N; None = cuda when available")
    seed: int = Field(0, description="seed of the random-init weights (used only without weights)")
    batch_size: int | None = Field(None, ge=1, description="tiles per encoder batch; None = 1024 GPU / 64 CPU")
    read_workers: int | None = Field(None, ge=1, description="tile-reading threads; None = CPUs (max 8)")
    slide_backend: str = Field("openslide", description="slide reader backend: 'openslide' or 'tiffslide'")
    mpp_from_magnification: bool = Field(
        False, description="opt-in: a slide with no MPP but an objective power gets 10 um / power (40x -> 0.25); "
                           "recorded as mpp_source 'magnification' in each feature file")
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    stain_normalization: str | None = Field(
        None, description="None | 'macenko' | 'reinhard': normalise tiles before encoding (recorded per file)")
    #: fsspec options for the store and remote slides (endpoint, region...). Excluded from run.json and
    #: reprs; prefer credentials from the environment / instance role over putting them here.
    storage_options: dict[str, Any] | None = Field(None, exclude=True, repr=False)
    #: folder for tissue-detection QC pictures (<qc_dir>/<slide_id>.png + contact sheets); None = none
    qc_dir: str | None = None

    @field_validator("stain_normalization")
    @classmethod
    def _known_stain_method(cls, value: str | None) -> str | None:
        from ..stain import METHODS

        if value is None or str(value).strip().lower() in ("", "none", "off"):
            return None
        if str(value).lower() not in METHODS:
            raise ValueError(f"unknown stain normalisation {value!r}; choose one of {list(METHODS)} or none")
        return str(value).lower()

    def stain_normalizer(self):
        """The configured normaliser (or None); its ``name`` goes into every feature file."""
        from ..stain import parse_stain_normalization

        return parse_stain_normalization(self.stain_normalization)

    def encoder_kwargs(self) -> dict[str, Any]:
        return {"name": self.encoder, "weights": self.weights, "device": self.device,
                "precision": self.precision, "seed": self.seed, "batch_size": self.batch_size}


def load_engine_encoder(cfg: EmbedConfig):
    """The encoder ``cfg`` describes (one per process/actor; loading is the slow part)."""
    from ..encoders import load_encoder

    return load_encoder(**cfg.encoder_kwargs())


def resume_key(encoder_settings: Mapping[str, Any], tiling: TilingConfig | Mapping[str, Any],
               stain_normalization: str | None = None) -> dict[str, Any]:
    """Everything that must match for an existing feature file to be reused: the file contract's
    ``settings_key`` (encoder identity, tile px, target MPP, stain normalisation, schema version) plus the
    full tiling config (tissue threshold and mask parameters change which tiles exist)."""
    tiling_dict = tiling.to_dict() if isinstance(tiling, TilingConfig) else dict(tiling)
    meta = FeatureFileMeta(slide_id="", encoder=dict(encoder_settings), tile_px=int(tiling_dict["tile_px"]),
                           target_mpp=float(tiling_dict["target_mpp"]), slide_mpp=0.0, level=0,
                           tile_size_level0_px=0.0, stain_normalization=stain_normalization)
    return {**meta.settings_key(), "tiling": tiling_dict}


def meta_resume_key(meta: FeatureFileMeta) -> dict[str, Any]:
    """``resume_key`` of an existing file, from its metadata. Tiling keys added since the file was written
    (e.g. ``snap_read_px``) take their defaults, which is how that file was made: upgrading keeps a store."""
    tiling = (meta.extra or {}).get("tiling")
    if isinstance(tiling, Mapping):
        tiling = {**TilingConfig().to_dict(), **tiling}
    return {**meta.settings_key(), "tiling": tiling}


def _torch_threads(device) -> int | None:
    """Intra-op threads the encoder ran with on CPU (provenance only: features are bit-identical for any
    count on one machine, see tests/test_reproducibility.py; None on GPU)."""
    import torch

    return int(torch.get_num_threads()) if str(device).startswith("cpu") else None


def status_row(row: Mapping[str, Any], status: str, *, error: str | None = None, n_tiles: int = 0,
               mpp: float | None = None, level: int | None = None, seconds: float = 0.0,
               **timing: float) -> dict[str, Any]:
    """One catalog row (see catalog.STATUS_COLUMNS)."""
    return {"slide_id": str(row["slide_id"]), "path": str(row.get("path", "")), "status": status,
            "error": error, "n_tiles": int(n_tiles), "mpp": None if mpp is None else float(mpp),
            "level": None if level is None else int(level), "seconds": round(float(seconds), 3),
            "read_wait_s": round(float(timing.get("read_wait_s", 0.0)), 3),
            "encode_s": round(float(timing.get("encode_s", 0.0)), 3)}


def _mpp_override(row: Mapping[str, Any]) -> float | None:
    value = row.get("mpp")
    if value is None or value == "":
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value > 0 and np.isfinite(value) else None


def _write_qc(reader, grid, cfg: EmbedConfig, sid: str) -> None:
    """The slide's QC picture (her2ray.tiling.qc); a failure to draw it never fails the slide."""
    from ..tiling.qc import write_slide_qc

    try:
        write_slide_qc(reader, grid, cfg.qc_dir, sid, cfg.storage_options)
    except Exception as exc:  # noqa: BLE001
        log.warning("QC picture of %s not written: %s", sid, exc)


def _mpp_provenance(reader, slide_id: str) -> dict[str, Any]:
    """Where the slide's MPP came from, the file's own MPP, and a warning when the manifest disagrees."""
    info: dict[str, Any] = {"mpp_source": reader.mpp_source, "mpp_file": reader.native_mpp}
    if reader.mpp_warning:
        log.warning("slide %s: %s", slide_id, reader.mpp_warning)
        info["mpp_warning"] = reader.mpp_warning
    return info


def embed_slide(row: Mapping[str, Any], encoder, cfg: EmbedConfig, out_store: str, *,
                cache=None) -> dict[str, Any]:
    """Embed one manifest row (``slide_id``, ``path``, optional ``mpp``) into ``out_store``.

    Returns a status row: ``ok`` with n_tiles/mpp/level/seconds, or ``failed`` with ``error``. Timing fields
    ``read_wait_s`` (encoder idle, waiting for tiles) and ``encode_s`` support throughput reports.
    """
    from ..slides import SlideCache, open_slide
    from ..tiling import iter_tile_batches, plan_tiles

    t0 = time.perf_counter()
    sid = str(row["slide_id"])
    mpp = level = None
    try:
        normalizer = cfg.stain_normalizer()
        if cache is None and cfg.storage_options:
            cache = SlideCache(storage_options=cfg.storage_options)
        beat("opening slide")
        with open_slide(row["path"], mpp_override=_mpp_override(row), backend=cfg.slide_backend,
                        cache=cache, mpp_from_magnification=cfg.mpp_from_magnification) as reader:
            beat("planning tissue tiles")
            grid = plan_tiles(reader, cfg.tiling, keep_mask=cfg.qc_dir is not None)
            mpp_info = _mpp_provenance(reader, sid)
            mpp, level = grid.slide_mpp, grid.level
            if cfg.qc_dir:
                _write_qc(reader, grid, cfg, sid)
            feats = np.empty((len(grid), encoder.dim), dtype=np.float16)
            wait = encode = 0.0
            beat("reading tiles")
            batches = iter_tile_batches(reader, grid, batch_size=encoder.batch_size,
                                        num_workers=cfg.read_workers, prefetch=True)
            while True:
                tw = time.perf_counter()
                item = next(batches, None)
                te = time.perf_counter()
                wait += te - tw
                if item is None:
                    break
                idx, tiles = item
                beat("reading and encoding tiles")
                if normalizer is not None:
                    tiles = normalizer(tiles)
                feats[idx] = encoder.embed_tiles(tiles)
                encode += time.perf_counter() - te
        meta = FeatureFileMeta(
            slide_id=sid, encoder=encoder.settings_identity(), tile_px=int(grid.tile_px),
            target_mpp=float(grid.target_mpp), slide_mpp=float(grid.slide_mpp), level=int(grid.level),
            tile_size_level0_px=float(grid.tile_size_level0_px),
            stain_normalization=None if normalizer is None else normalizer.name,
            extra={"tiling": cfg.tiling.to_dict(), "grid": grid.metadata(), "slide_path": str(row["path"]),
                   **mpp_info,
                   "precision": encoder.precision, "device": str(encoder.device),
                   "torch_threads": _torch_threads(encoder.device),
                   "random_weights": bool(encoder.random_weights)})
        beat("writing the feature file")
        table = build_feature_table(sid, grid.x, grid.y, grid.tissue_fraction, feats, meta)
        storage.write_parquet_atomic(table, feature_url(out_store, sid), cfg.storage_options)
        return status_row(row, STATUS_OK, n_tiles=len(grid), mpp=mpp, level=level,
                          seconds=time.perf_counter() - t0, read_wait_s=wait, encode_s=encode)
    except SlideError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("slide %s failed: %s", sid, reason)
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop a cohort; the reason is kept
        reason = f"unexpected {type(exc).__name__}: {exc}"
        log.error("slide %s failed unexpectedly: %s\n%s", sid, reason, traceback.format_exc())
    return status_row(row, STATUS_FAILED, error=reason, mpp=mpp, level=level, seconds=time.perf_counter() - t0)
