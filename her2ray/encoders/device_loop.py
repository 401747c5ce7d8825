"""The encode loop of the pipelined engine: one thread owns the device and never waits on the host.

Callers (Ray Data calls of the encoder actor, possibly two at once) hand in rows of tile payloads from any
slides; ``encode_rows`` groups them by payload kind and cuts them into **fixed-shape forwards** of exactly
``rows`` tiles (the last one padded with zeros), so a tile's features never depend on which other tiles
shared its batch. The device thread then, per forward:

* fills a **reusable pinned host buffer** (one copy from the payload bytes; the ring has ``depth + 1`` slots
  per tile shape, allocated once) -- raw-pixel payloads only; JPEG payloads go to nvJPEG as they are;
* copies it to the device on a **side stream** and records an event the compute stream waits on;
* decodes / assembles / downscales on the device (``device_tiles``), normalises, runs the encoder;
* copies the features back **asynchronously** into a pinned output slot and records a done event;
* keeps up to ``depth`` (>= 2) forwards in flight and completes the oldest only when it has to.

On a CPU device the same code runs synchronously (no streams, events or pinned memory), which is how it
is tested here. ``stats`` tells how long the device thread sat idle waiting for input (``idle_s``) versus
working (``busy_s``), plus padded rows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .device_tiles import box_downscale, decode_jpeg_payloads, jpeg_rgb_selftest

KIND_RGB, KIND_JPEG = "rgb", "jpeg"


def decoder_name(device_type: str) -> str:
    """The JPEG decoder the loop uses on a device type (recorded in every feature file)."""
    import torchvision

    lib = "nvjpeg" if device_type == "cuda" else "libjpeg-turbo"
    return f"{lib} (torchvision {torchvision.__version__})"


@dataclass
class MicroBatch:
    kind: str                      # "rgb": raw uint8 [src_px, src_px, 3] bytes; "jpeg": packed k*k streams
    payloads: list
    src_px: int
    k: int
    rgb_coded: bool
    tile_px: int


@dataclass
class LoopStats:
    forwards: int = 0
    rows: int = 0
    padded_rows: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0
    decoded_on_cpu: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"forwards": self.forwards, "rows": self.rows, "padded_rows": self.padded_rows,
                "busy_s": round(self.busy_s, 4), "idle_s": round(self.idle_s, 4),
                "decoded_on_cpu": self.decoded_on_cpu, **self.extra}


class EncodeLoop:
    """Fixed-shape, pipelined encoding of tile payloads on ``encoder.device`` (see the module docstring)."""

    def __init__(self, encoder, rows: int | None = None, depth: int = 2):
        self.encoder = encoder
        self.rows = int(rows or encoder.batch_size)
        self.depth = max(2, int(depth))
        self.device = encoder.device
        self.cuda = self.device.type == "cuda"
        self.stats = LoopStats()
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._in_rings: dict[int, list] = {}
        self._out_ring = [self._alloc((self.rows, encoder.dim), torch.float32) for _ in range(self.depth + 1)]
        self._launches = 0
        selftest = jpeg_rgb_selftest(self.device) if self.cuda else {"ycbcr_max_diff": 0, "rgb_max_diff": 0}
        #: RGB-coded JPEGs (Aperio) go to the CPU decoder when the device decoder gets them wrong
        self.rgb_jpeg_on_device = selftest["rgb_max_diff"] <= 2
        self.stats.extra.update(decoder_selftest=selftest, decoder=self.decoder_name())
        self._queue: queue.Queue = queue.Queue(maxsize=2 * self.depth)
        self._thread = threading.Thread(target=self._run, daemon=True, name="her2ray-encode-loop")
        self._closed = False
        self._thread.start()

    def decoder_name(self) -> str:
        return decoder_name(self.device.type)

    # ---- public -------------------------------------------------------------------------------
    def encode_rows(self, kinds: Sequence[str], payloads: Sequence, src_px: Sequence[int], k: Sequence[int],
                    rgb_coded: Sequence[bool], tile_px: int) -> np.ndarray:
        """float16 ``[n, dim]`` features of mixed rows (any slides, any kinds), in input order."""
        n = len(kinds)
        out = np.zeros((n, self.encoder.dim), dtype=np.float16)
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault((str(kinds[i]), int(src_px[i]), int(k[i]), bool(rgb_coded[i])), []).append(i)
        pending = []
        for (kind, sp, kk, rgb), idx in groups.items():
            for s in range(0, len(idx), self.rows):
                part = idx[s:s + self.rows]
                item = MicroBatch(kind, [payloads[i] for i in part], sp, kk, rgb, int(tile_px))
                pending.append((part, self.submit(item)))
        for part, fut in pending:
            out[part] = fut.result()
        return out

    def submit(self, item: MicroBatch) -> Future:
        if self._closed:
            raise RuntimeError("encode loop is closed")
        if not 0 < len(item.payloads) <= self.rows:
            raise ValueError(f"a forward takes 1..{self.rows} tiles, got {len(item.payloads)}")
        fut: Future = Future()
        self._queue.put((item, fut))
        return fut

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    # ---- device thread -----------------------------------------------------------------------
    def _run(self) -> None:
        inflight: deque = deque()
        started = None
        while True:
            if inflight:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:                       # nothing new: finish the oldest forward
                    self._complete(inflight.popleft())
                    continue
            else:
                t0 = time.perf_counter()
                job = self._queue.get()
                if started is not None:
                    self.stats.idle_s += time.perf_counter() - t0
            if job is None:
                while inflight:
                    self._complete(inflight.popleft())
                return
            item, fut = job
            t0 = time.perf_counter()
            started = started or t0
            try:
                inflight.append((fut, *self._launch(item)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)
            if len(inflight) >= self.depth:
                self._complete(inflight.popleft())
            self.stats.busy_s += time.perf_counter() - t0

    def _complete(self, entry) -> None:
        fut, out, done, n = entry
        t0 = time.perf_counter()
        try:
            if done is not None:
                done.synchronize()
            fut.set_result(out[:n].numpy().astype(np.float16))
        except BaseException as exc:  # noqa: BLE001
            fut.set_exception(exc)
        self.stats.busy_s += time.perf_counter() - t0

    def _alloc(self, shape, dtype) -> torch.Tensor:
        t = torch.zeros(shape, dtype=dtype)
        return t.pin_memory() if self.cuda else t

    def _in_slot(self, src_px: int, slot: int):
        ring = self._in_rings.get(src_px)
        if ring is None:
            ring = self._in_rings[src_px] = [[self._alloc((self.rows, src_px, src_px, 3), torch.uint8), None]
                                             for _ in range(self.depth + 1)]
        return ring[slot]

    @torch.inference_mode()
    def _launch(self, item: MicroBatch):
        slot = self._launches % (self.depth + 1)
        self._launches += 1
        n = len(item.payloads)
        if item.kind == KIND_RGB:
            x = self._upload_pixels(item, slot)
        elif item.kind == KIND_JPEG:
            on_device = self.rgb_jpeg_on_device or not item.rgb_coded
            x = decode_jpeg_payloads(item.payloads, item.k, self.device if on_device else torch.device("cpu"))
            if not on_device:
                self.stats.decoded_on_cpu += n
                x = x.to(self.device)
            x = x.float()
            if n < self.rows:
                x = torch.cat([x, x.new_zeros((self.rows - n, *x.shape[1:]))])
        else:
            raise ValueError(f"unknown tile payload kind {item.kind!r}")
        if x.shape[-1] < item.tile_px:
            raise ValueError(f"tiles of {x.shape[-1]} px cannot be downscaled to {item.tile_px} px")
        x = box_downscale(x, item.tile_px)
        feats = self.encoder(self.encoder.prepare(x))
        out = self._out_ring[slot]
        done = None
        if self.cuda:
            out.copy_(feats, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            out.copy_(feats)
        self.stats.forwards += 1
        self.stats.rows += n
        self.stats.padded_rows += self.rows - n
        return out, done, n

    def _upload_pixels(self, item: MicroBatch, slot: int) -> torch.Tensor:
        s = int(item.src_px)
        entry = self._in_slot(s, slot)
        host, copied = entry
        if copied is not None:
            copied.synchronize()                          # the slot's previous upload has finished
        view = host.numpy()
        for i, p in enumerate(item.payloads):
            view[i] = np.frombuffer(p, dtype=np.uint8).reshape(s, s, 3)
        view[len(item.payloads):] = 0
        if self.cuda:
            with torch.cuda.stream(self._copy_stream):
                dev = host.to(self.device, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._copy_stream)
            torch.cuda.current_stream(self.device).wait_event(ev)
            dev.record_stream(torch.cuda.current_stream(self.device))
            entry[1] = ev
        else:
            dev = host
        return dev.permute(0, 3, 1, 2).float()
