"""Per-slide feature files from a stream of encoded tiles of many slides (no Ray here).

The encoder emits tiles of any slides in any order. ``SlideAssembler`` keeps one growing array per slide and,
when a slide's last tile has arrived, hands the slide to a small thread pool that builds the Arrow table and
commits ``<store>/features/<slide_id>.parquet`` with one atomic write (``storage.write_parquet_atomic``: local
temp file + rename, or one S3 PUT), so nothing here is on the encoder's critical path and a reader never sees
a partial slide. An ``error`` row fails its slide (later tiles of it are dropped); a slide whose tiles stop
coming (a crashed worker) is failed by ``finish``. Tiles delivered twice (a retried read task) count once.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .. import storage
from .embed import STATUS_FAILED, STATUS_OK, EmbedConfig, status_row
from .reading import KIND_ERROR
from .schema import FeatureFileMeta, build_feature_table, feature_url

log = logging.getLogger(__name__)

NO_RESULT = ("no result from the worker (process crashed or the block errored; see the Ray worker logs)")


@dataclass
class _Slide:
    n: int
    dim: int
    first_seen: float
    feats: np.ndarray = None
    x: np.ndarray = None
    y: np.ndarray = None
    frac: np.ndarray = None
    got: np.ndarray = None
    count: int = 0
    info: dict | None = None
    read_s: float = 0.0
    encode_s: float = 0.0

    def __post_init__(self):
        self.feats = np.zeros((self.n, self.dim), np.float16)
        self.x, self.y = np.zeros(self.n, np.int64), np.zeros(self.n, np.int64)
        self.frac = np.zeros(self.n, np.float32)
        self.got = np.zeros(self.n, bool)


@dataclass
class AssemblerStats:
    write_s: float = 0.0
    tiles: int = 0
    extra: dict = field(default_factory=dict)


class SlideAssembler:
    """Collect encoded tile rows; commit each slide when complete (see the module docstring)."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], out_store: str, cfg: EmbedConfig,
                 encoder_settings: Mapping[str, Any], provenance: Mapping[str, Any], *, writers: int = 2):
        self.rows = {str(r["slide_id"]): dict(r) for r in rows}
        self.out_store, self.cfg = out_store, cfg
        self.encoder_settings = dict(encoder_settings)
        self.provenance = dict(provenance)
        self.dim = int(encoder_settings["dim"])
        self._open: dict[str, _Slide] = {}
        self._closed: set[str] = set()
        self._writes: list[tuple[str, Future]] = []
        self._done: list[dict[str, Any]] = []
        self._pool = ThreadPoolExecutor(max_workers=max(1, writers), thread_name_prefix="her2ray-commit")
        self.stats = AssemblerStats()

    def add(self, cols: Mapping[str, Any]) -> None:
        """Take one batch of encoder output rows (columns incl. ``feature`` [n, dim])."""
        sids = [str(s) for s in cols["slide_id"]]
        kinds = cols["kind"]
        now = time.perf_counter()
        for sid in dict.fromkeys(sids):
            if sid in self._closed:
                continue
            rows = np.array([i for i, s in enumerate(sids) if s == sid])
            err = [i for i in rows if kinds[i] == KIND_ERROR]
            if err:
                self._fail(sid, str(cols["info"][err[0]]))
                continue
            st = self._open.get(sid)
            if st is None:
                st = self._open[sid] = _Slide(int(cols["n_tiles"][rows[0]]), self.dim, now)
            ti = np.asarray(cols["tile_index"])[rows]
            new = ~st.got[ti]
            rows, ti = rows[new], ti[new]
            st.got[ti] = True
            st.count += len(ti)
            st.feats[ti] = np.asarray(cols["feature"])[rows]
            st.x[ti], st.y[ti] = np.asarray(cols["x"])[rows], np.asarray(cols["y"])[rows]
            st.frac[ti] = np.asarray(cols["tissue_fraction"])[rows]
            st.read_s += float(np.asarray(cols["read_s"])[rows].sum())
            if "encode_s" in cols:
                st.encode_s += float(np.asarray(cols["encode_s"])[rows].sum())
            for i in rows:
                if cols["info"][i]:
                    st.info = json.loads(cols["info"][i])
            self.stats.tiles += len(ti)
            if st.count == st.n and st.info is not None:
                self._closed.add(sid)
                del self._open[sid]
                self._writes.append((sid, self._pool.submit(self._commit, sid, st)))

    def _fail(self, sid: str, error: str) -> None:
        self._closed.add(sid)
        st = self._open.pop(sid, None)
        info = (st.info if st else None) or {}
        log.warning("slide %s failed: %s", sid, error.splitlines()[0] if error else error)
        self._done.append(status_row(self.rows.get(sid, {"slide_id": sid}), STATUS_FAILED, error=error,
                                     mpp=info.get("slide_mpp"), level=info.get("level"),
                                     seconds=0.0 if st is None else time.perf_counter() - st.first_seen))

    def _commit(self, sid: str, st: _Slide) -> dict[str, Any]:
        t0 = time.perf_counter()
        row = self.rows.get(sid, {"slide_id": sid, "path": ""})
        info = st.info
        normalizer = self.cfg.stain_normalizer()
        extra = {"tiling": self.cfg.tiling.to_dict(), "grid": info["grid"], "slide_path": str(row.get("path", "")),
                 **info["mpp"], **self.provenance,
                 "random_weights": bool(self.encoder_settings.get("random_weights")),
                 "transport": {**info["transport"], "decoder": self.provenance.get("decoder")}}
        meta = FeatureFileMeta(
            slide_id=sid, encoder=self.encoder_settings, tile_px=int(info["tile_px"]),
            target_mpp=float(info["target_mpp"]), slide_mpp=float(info["slide_mpp"]), level=int(info["level"]),
            tile_size_level0_px=float(info["tile_size_level0_px"]),
            stain_normalization=None if normalizer is None else normalizer.name, extra=extra)
        table = build_feature_table(sid, st.x, st.y, st.frac, st.feats, meta)
        storage.write_parquet_atomic(table, feature_url(self.out_store, sid), self.cfg.storage_options)
        self.stats.write_s += time.perf_counter() - t0
        return status_row(row, STATUS_OK, n_tiles=st.n, mpp=info["slide_mpp"], level=info["level"],
                          seconds=time.perf_counter() - st.first_seen + float(info.get("plan_s", 0.0)),
                          read_wait_s=st.read_s, encode_s=st.encode_s)

    def poll(self) -> list[dict[str, Any]]:
        """Status rows of slides finished (committed or failed) since the last call."""
        out, self._done = self._done, []
        keep = []
        for sid, fut in self._writes:
            if fut.done():
                out.append(self._result(sid, fut))
            else:
                keep.append((sid, fut))
        self._writes = keep
        return out

    def _result(self, sid: str, fut: Future) -> dict[str, Any]:
        try:
            return fut.result()
        except Exception as exc:  # noqa: BLE001 - a failed commit fails that slide only
            log.error("slide %s: writing its feature file failed: %s", sid, exc)
            return status_row(self.rows.get(sid, {"slide_id": sid}), STATUS_FAILED,
                              error=f"writing the feature file failed: {type(exc).__name__}: {exc}")

    def finish(self) -> list[dict[str, Any]]:
        """Wait for pending commits; fail slides whose tiles never all arrived. Returns the last status rows."""
        out = self.poll()
        for sid, fut in self._writes:
            out.append(self._result(sid, fut))
        self._writes = []
        self._pool.shutdown(wait=True)
        for sid in list(self._open):
            st = self._open[sid]
            self._fail(sid, f"{NO_RESULT}: {st.count} of {st.n} tiles arrived")
        out.extend(self._done)
        self._done = []
        return out
