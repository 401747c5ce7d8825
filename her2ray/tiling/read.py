"""Bulk tile reading: one region read per strip of adjacent tiles, split with numpy, in a thread pool.

Why strips: one ``read_region`` per strip instead of per tile pays the per-call costs (locking, buffer
allocation, pixel-format conversion, PIL wrapping) once per strip, and each of the file's tiles under a
strip is decoded once even when the file's tile grid does not match ours (240 px Aperio tiles under
256 px grid tiles). Strips are read concurrently: OpenSlide and the direct JPEG decoder
(``her2ray.slides.tiff_tiles``) release the GIL. Measured on the 2-core dev box
(``benchmarks/tile_read.py``): through OpenSlide itself, strips cost about the same CPU as per-tile reads
(OpenSlide caches decoded tiles), so the gain there is the threads; the large gain (2.3-4x less CPU per
tile) comes from the reader's direct tile decoding, which strips keep cheap to assemble. When the read
level is finer than the target the split tiles are resized one by one (box filter), so a tile's pixels
never depend on its neighbours or on which other tiles were requested with it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

from .grid import TileGrid

#: widest strip read in one call, in read-level pixels (16 tiles of 256 px)
MAX_STRIP_PX = 4096


def default_workers() -> int:
    """Threads for reading: the CPUs this process may use, capped at 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def plan_strips(cols: np.ndarray, rows: np.ndarray, max_tiles: int) -> list[tuple[int, int, int, np.ndarray]]:
    """Group tiles into strips of adjacent columns within a row.

    Returns (row, first_col, n_cols, positions) per strip, where ``positions[k]`` is the output slot of
    column ``first_col + k`` (or -1 for a column not requested). Duplicated requests are handled by the
    caller.
    """
    order = np.lexsort((cols, rows))
    strips = []
    start = 0
    n = len(order)
    while start < n:
        r = rows[order[start]]
        c0 = cols[order[start]]
        end = start + 1
        while (end < n and rows[order[end]] == r and cols[order[end]] == cols[order[end - 1]] + 1
               and cols[order[end]] - c0 < max_tiles):
            end += 1
        strips.append((int(r), int(c0), int(end - start), order[start:end]))
        start = end
    return strips


def read_tiles(reader, grid: TileGrid, indices: Sequence[int] | None = None, *,
               num_workers: int | None = None, executor: Executor | None = None,
               max_strip_px: int = MAX_STRIP_PX, resize: bool = True) -> np.ndarray:
    """uint8 [N, tile_px, tile_px, 3] RGB tiles of ``grid`` (all, or ``indices`` in that order).

    ``resize=False`` returns the tiles as read, ``[N, read_px, read_px, 3]``, for a caller that resizes them
    elsewhere (the pipelined engine downscales on the encoder's device, never on the CPU).
    """
    idx = np.arange(len(grid), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    tp = int(grid.tile_px) if resize else int(grid.read_px)
    out = np.empty((len(idx), tp, tp, 3), dtype=np.uint8)
    if len(idx) == 0:
        return out
    uniq, inverse = np.unique(idx, return_inverse=True)
    cols, rows = grid.col[uniq], grid.row[uniq]
    strips = plan_strips(cols, rows, max(1, int(max_strip_px) // int(grid.read_px)))
    buf = out if len(uniq) == len(idx) and np.array_equal(uniq, idx) else np.empty((len(uniq), tp, tp, 3), np.uint8)

    def work(strip):
        _read_strip(reader, grid, strip, buf, tp)

    if executor is not None:
        list(executor.map(work, strips))
    else:
        workers = num_workers or default_workers()
        if workers <= 1 or len(strips) == 1:
            for s in strips:
                work(s)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(strips)),
                                    thread_name_prefix="her2ray-tiles") as pool:
                list(pool.map(work, strips))
    if buf is not out:
        out[:] = buf[inverse.reshape(-1)]
    return out


def _read_strip(reader, grid: TileGrid, strip, dest: np.ndarray, tp: int) -> None:
    row, c0, n, positions = strip
    rp = int(grid.read_px)
    ts = grid.tile_size_level0_px
    x0 = int(round(c0 * ts))
    y0 = int(round(row * ts))
    region = reader.read_region(x0, y0, grid.level, n * rp, rp)  # [rp, n*rp, 3]
    for k, pos in enumerate(positions):  # plain slice copies: faster than fancy-indexing a transposed view
        tile = region[:, k * rp:(k + 1) * rp]
        dest[pos] = tile if rp == tp else resize_tile(tile, tp)


def resize_tile(tile: np.ndarray, tile_px: int) -> np.ndarray:
    """Resize one uint8 RGB tile to tile_px x tile_px: box filter down (area average), bilinear up."""
    from PIL import Image

    resample = Image.Resampling.BOX if tile.shape[0] >= tile_px else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(tile)).resize((tile_px, tile_px), resample))


def iter_tile_batches(reader, grid: TileGrid, batch_size: int = 64, *, num_workers: int | None = None,
                      prefetch: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, uint8 [b, tile_px, tile_px, 3])`` over the grid in order.

    With ``prefetch`` the next batch is read in the background while the caller works on the current
    one (e.g. while the encoder runs), which hides slide decode time behind compute.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunks = [np.arange(s, min(s + batch_size, len(grid)), dtype=np.int64)
              for s in range(0, len(grid), batch_size)]
    if not chunks:
        return
    workers = num_workers or default_workers()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="her2ray-tiles") as pool:
        def read(ix):
            return read_tiles(reader, grid, ix, executor=pool if workers > 1 else None, num_workers=1)

        if not prefetch:
            for ix in chunks:
                yield ix, read(ix)
            return
        ahead = _Background(read, chunks[0])
        try:
            for k, ix in enumerate(chunks):
                batch = ahead.result()
                if k + 1 < len(chunks):
                    ahead = _Background(read, chunks[k + 1])
                yield ix, batch
        finally:
            # the consumer may stop early and then close the slide: never leave a read in flight
            ahead.join()


class _Background:
    """Run ``fn(arg)`` in a daemon thread (separate from the read pool, so nesting cannot deadlock)."""

    def __init__(self, fn, arg):
        self._result = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, arg), daemon=True,
                                        name="her2ray-tiles-prefetch")
        self._thread.start()

    def _run(self, fn, arg):
        try:
            self._result = fn(arg)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
