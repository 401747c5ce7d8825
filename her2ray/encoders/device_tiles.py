"""Tile pixels made on the encoder's device: JPEG decode, k x k assembly and box downscale, in torch.

The same functions run on a CUDA device (nvJPEG through ``torchvision.io.decode_jpeg(..., device="cuda")``,
batched) and on the CPU (libjpeg-turbo through torchvision), so the logic is tested without a GPU.

Downscale = PIL's BOX filter, computed exactly as PIL does (each output pixel averages the input pixels
whose centres fall in its window, ``precompute_coeffs`` in PIL's Resample.c) but without PIL's intermediate
uint8 rounding; so device tiles differ from the CPU reference (``tiling.read.resize_tile``) by at most 1 grey
level, and a tile's pixels never depend on its neighbours. Cost: two cumulative sums and a gather per axis.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ..tiling.jpeg_payload import pack_streams, unpack_streams


@lru_cache(maxsize=64)
def box_bounds(in_px: int, out_px: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) input pixels averaged into each output pixel by PIL's BOX filter (downscaling)."""
    if out_px > in_px:
        raise ValueError(f"box_bounds downscales only ({in_px} -> {out_px})")
    scale = in_px / out_px
    support = 0.5 * scale
    starts, stops = np.empty(out_px, np.int64), np.empty(out_px, np.int64)
    for i in range(out_px):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_px)
        xs = np.arange(lo, hi)
        v = (xs - center + 0.5) / scale
        inside = xs[(v > -0.5) & (v <= 0.5)]
        starts[i], stops[i] = inside[0], inside[-1] + 1
    return starts, stops


def _box_axis(x: torch.Tensor, out_px: int, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    if n == out_px:
        return x
    if n % out_px == 0:                                   # integer factor: plain mean over blocks
        f = n // out_px
        shape = list(x.shape)
        shape[dim:dim + 1] = [out_px, f]
        return x.reshape(shape).mean(dim=dim + 1)
    starts, stops = box_bounds(n, out_px)
    pad = [0] * (2 * x.ndim)
    pad[2 * (x.ndim - 1 - dim)] = 1                        # one leading zero along ``dim``
    c = torch.nn.functional.pad(torch.cumsum(x, dim=dim), tuple(pad))
    lo = torch.as_tensor(starts, device=x.device)
    hi = torch.as_tensor(stops, device=x.device)
    width = (hi - lo).to(x.dtype)
    shape = [1] * x.ndim
    shape[dim] = out_px
    return (c.index_select(dim, hi) - c.index_select(dim, lo)) / width.view(shape)


def box_downscale(x: torch.Tensor, out_px: int) -> torch.Tensor:
    """float ``[N, C, H, W]`` -> ``[N, C, out_px, out_px]`` (PIL BOX weights, no rounding); identity if equal."""
    if x.shape[-1] == out_px and x.shape[-2] == out_px:
        return x
    if x.dtype != torch.float64 and x.device.type == "cpu" and x.shape[-1] % out_px:
        x = x.double()                                    # cumsum of up to ~500 values: keep exact on CPU
    y = _box_axis(_box_axis(x, out_px, x.ndim - 1), out_px, x.ndim - 2)
    return y.float()


def decode_jpeg_payloads(payloads: Sequence[bytes], k: int, device: torch.device) -> torch.Tensor:
    """Packed k*k JPEG payloads (``tiling.jpeg_payload``) -> uint8 ``[N, 3, k*ft, k*ft]`` on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    streams = []
    for p in payloads:
        parts = unpack_streams(p)
        if len(parts) != k * k:
            raise ValueError(f"tile payload holds {len(parts)} JPEG streams, expected {k * k}")
        streams.extend(torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in parts)
    if device.type == "cuda":
        try:
            tiles = decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)     # batched nvJPEG
        except RuntimeError:                  # older torchvision: no mode on the GPU (3-channel tiles anyway)
            tiles = decode_jpeg(streams, device=device)
    else:
        tiles = decode_jpeg(streams, mode=ImageReadMode.RGB)
    stacked = torch.stack(tiles)                          # [N*k*k, 3, ft, ft]
    n, ft = len(payloads), stacked.shape[-1]
    if stacked.shape[-2] != ft:
        raise ValueError(f"JPEG file tiles are not square: {tuple(stacked.shape[-2:])}")
    # [N, k(rows), k(cols), 3, ft, ft] -> [N, 3, k, ft, k, ft] -> [N, 3, k*ft, k*ft]
    return stacked.view(n, k, k, 3, ft, ft).permute(0, 3, 1, 4, 2, 5).reshape(n, 3, k * ft, k * ft)


def jpeg_rgb_selftest(device: torch.device) -> dict:
    """Does ``device``'s JPEG decoder honour an Adobe 'RGB, no transform' marker and agree with the CPU?

    Returns max abs differences (grey levels) for a YCbCr JFIF and an RGB-coded JPEG; RGB-coded slides are
    decoded on the CPU when the device gets the RGB case wrong (the engine checks this once per actor).
    """
    import io

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from ..slides.tiff_tiles import ADOBE_RGB_APP14, SOI

    rng = np.random.default_rng(0)
    img = (rng.random((64, 64, 3)) * 64 + np.linspace(60, 190, 64)[None, :, None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    ycc = buf.getvalue()
    buf = io.BytesIO()
    try:
        Image.fromarray(img).save(buf, format="JPEG", quality=90, keep_rgb=True)   # components stored as RGB
        rgb = buf.getvalue()
        if ADOBE_RGB_APP14[4:9] not in rgb:
            rgb = SOI + ADOBE_RGB_APP14 + rgb[2:]
    except TypeError:                                  # Pillow < 11: no RGB JPEGs; the RGB case counts as failed
        rgb = None
    out = {"rgb_max_diff": 255}
    for name, data in (("ycbcr", ycc), ("rgb", rgb)):
        if data is None:
            continue
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        ref = decode_jpeg(t, mode=ImageReadMode.RGB).int()
        got = decode_jpeg_payloads([pack_streams([data])], 1, device)[0] if device.type == "cuda" else ref
        out[f"{name}_max_diff"] = int((got.cpu().int() - ref).abs().max())
    return out
