"""Optional stain normalisation of tiles before embedding (Macenko or Reinhard).

Entry point for the embedding engine::

    from her2ray.stain import build_stain_normalizer
    norm = build_stain_normalizer("macenko")            # or ("reinhard", reference=uint8 RGB tile)
    tiles = norm(tiles)                                  # uint8 [N,H,W,3] -> uint8 [N,H,W,3]
    meta.stain_normalization = norm.name                 # e.g. "macenko:3f2a9c1d0b7e"

``name`` hashes the method, its hyper-parameters and the fitted target, so features made with different
normalisation (or none) never share a resume/settings key. Tiles that cannot be normalised (background,
single-stain, too little tissue) come back unchanged, never NaN.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from . import macenko, reinhard
from .od import IO, OD_BACKGROUND, as_batch
from .reference import DEFAULT_MACENKO, DEFAULT_REINHARD

METHODS = ("macenko", "reinhard")
_MODULES = {"macenko": macenko, "reinhard": reinhard}

__all__ = ["METHODS", "StainNormalizer", "build_stain_normalizer", "parse_stain_normalization"]


@dataclass(frozen=True, eq=False)
class StainNormalizer:
    """Callable uint8 [N,H,W,3] -> uint8 [N,H,W,3]; each tile is fitted and re-rendered on its own.

    Plain data (picklable), so it can be built on the driver and shipped to Ray workers.
    """

    method: str
    params: Any                      # MacenkoParams | ReinhardParams (the target)
    settings: dict[str, Any]

    @property
    def name(self) -> str:
        """``<method>:<12 hex>``: stable across runs and machines; recorded in FeatureFileMeta."""
        payload = json.dumps({"method": self.method, "settings": self.settings,
                              "target": [round(v, 6) for v in self.params.as_tuple()]}, sort_keys=True)
        return f"{self.method}:{hashlib.sha256(payload.encode()).hexdigest()[:12]}"

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        batch, single = as_batch(tiles)
        out = np.empty_like(batch)
        # per-tile matrices are [65k, 3] x [3, 3]: multi-threaded BLAS only adds contention there
        # (25x slower measured on 2 busy cores); only numpy's BLAS is limited, torch's threads are not.
        with threadpool_limits(limits=1, user_api="blas"):
            for i in range(batch.shape[0]):
                out[i] = _MODULES[self.method].normalize_tile(batch[i], self.params)
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"StainNormalizer({self.name})"


def build_stain_normalizer(method: str, reference: np.ndarray | None = None) -> StainNormalizer:
    """A normaliser towards ``reference`` (uint8 RGB tile [H,W,3], or several [N,H,W,3]) or the defaults.

    The defaults are constants fitted from a real CC0 H&E slide (see ``her2ray.stain.reference``).
    Raises ValueError for an unknown method or a reference without enough two-stain tissue.
    """
    method = str(method).strip().lower()
    if method == "macenko":
        params = DEFAULT_MACENKO if reference is None else macenko.fit_macenko(_check_ref(reference))
        return StainNormalizer("macenko", params, {"io": IO, "alpha": 1.0, "beta": OD_BACKGROUND, "residual": True})
    if method == "reinhard":
        params = DEFAULT_REINHARD if reference is None else reinhard.fit_reinhard(_check_ref(reference))
        return StainNormalizer("reinhard", params, {"beta": OD_BACKGROUND, "space": "lalphabeta-tissue"})
    raise ValueError(f"unknown stain normalisation method {method!r}; choose one of {METHODS}")


def parse_stain_normalization(value: str | None) -> StainNormalizer | None:
    """Config helper: None/""/"none" -> None, "macenko"/"reinhard" -> default-target normaliser."""
    if value is None or str(value).strip().lower() in ("", "none", "off", "false"):
        return None
    return build_stain_normalizer(str(value))


def _check_ref(reference: np.ndarray) -> np.ndarray:
    ref = np.asarray(reference)
    if ref.dtype != np.uint8 or ref.shape[-1] != 3 or ref.ndim not in (3, 4):
        raise ValueError(f"reference must be a uint8 RGB tile [H,W,3] or [N,H,W,3], got {ref.dtype} {ref.shape}")
    return ref
