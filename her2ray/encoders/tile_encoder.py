"""The tile encoder every stage uses: uint8 RGB tiles in, float32 embeddings out.

Why one generic class: PLIP, QuiltNet and any other open_clip image tower differ only in weights, input
size and normalisation, so one module wrapping ``open_clip``'s ``model.visual`` covers them; the identity
dict records which one produced a feature file.

Preprocessing runs on the encoder's device (uint8 crosses the bus, 4x less than float): ``/255`` ->
bicubic antialiased resize to the tower's input size (256 -> 224 for PLIP, no crop: the whole tile is
kept, as PLIP's processor does for square tiles) -> clamp to [0, 1] (as PIL/uint8 resizers do) -> mean/std.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16", "bf16-pure", "fp16-pure")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_precision(device: torch.device) -> str:
    """bf16 autocast on GPUs that support it, fp16 on older ones, exact float32 on CPU."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class TileEncoder(nn.Module):
    """An image tower plus its preprocessing.

    ``forward`` takes normalised ``[N, 3, S, S]`` float tensors and returns ``[N, dim]`` (the unnormalised
    projection, equal to transformers' ``CLIPModel.get_image_features``). ``embed_tiles`` is the
    end-to-end call the pipeline uses. ``identity`` says which weights these are; when
    ``identity["random_weights"]`` is True the features mean nothing biologically.
    """

    def __init__(self, visual: nn.Module, identity: dict[str, Any], *, mean: Sequence[float],
                 std: Sequence[float], input_size: int, device: str | torch.device | None = None,
                 precision: str | None = None, batch_size: int | None = None):
        super().__init__()
        self.visual = visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.device = torch.device(device) if device is not None else default_device()
        precision = precision or default_precision(self.device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.batch_size = int(batch_size or (1024 if self.device.type == "cuda" else 64))
        self.to(self.device)
        if precision.endswith("-pure"):
            self.visual.to(_DTYPES[precision.split("-")[0]])
        self.identity = dict(identity, precision=precision, device=self.device.type)

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    @property
    def random_weights(self) -> bool:
        return bool(self.identity.get("random_weights"))

    def settings_identity(self) -> dict[str, Any]:
        """What must match for two feature files to be comparable (goes into the feature file metadata).

        Device and precision are left out on purpose: bf16 vs fp32 changes features at the 1e-2 level,
        far below stain variation; they are recorded in run.json instead.
        """
        keys = ("name", "architecture", "weights_sha256", "dim", "random_weights", "preprocess")
        return {k: self.identity[k] for k in keys if k in self.identity}

    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision.endswith("-pure"):
            x = x.to(_DTYPES[self.precision.split("-")[0]])
        with self._autocast():
            out = self.visual(x)
        return out.float()

    def preprocess(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` (numpy or tensor) -> normalised float32 ``[N, 3, S, S]`` on the device."""
        t = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
        if t.ndim != 4 or t.shape[-1] != 3:
            raise ValueError(f"expected uint8 tiles [N, H, W, 3], got shape {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            raise ValueError(f"expected uint8 tiles, got {t.dtype}")
        if self.device.type == "cuda" and t.device.type == "cpu":
            t = t.pin_memory().to(self.device, non_blocking=True)
        else:
            t = t.to(self.device)
        return self.prepare(t.permute(0, 3, 1, 2).float())

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """float ``[N, 3, H, W]`` in 0..255 on the device -> normalised ``[N, 3, S, S]`` (``preprocess``'s
        second half, also used by the pipelined engine on tiles decoded/downscaled on the device)."""
        x = x.div(255.0)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                              align_corners=False, antialias=True).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def embed_tiles(self, tiles: np.ndarray | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """uint8 tiles ``[N, H, W, 3]`` -> float32 embeddings ``[N, dim]`` (numpy, on the host)."""
        n = len(tiles)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        bs = int(batch_size or self.batch_size)
        outs = [self(self.preprocess(tiles[i:i + bs])).cpu() for i in range(0, n, bs)]
        return torch.cat(outs).numpy()
