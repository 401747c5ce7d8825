"""``write_synthetic_slide``: one synthetic H&E-like whole-slide image, optionally with a planted label.

Why synthetic slides: real HER2 cohorts are large and restricted; tests, benchmarks and the demo need
slides of any size, resolution and label, made in seconds, that exercise the real reading path
(pyramidal JPEG TIFF opened by OpenSlide, with MPP metadata) and carry a learnable class signal.
"""

from __future__ import annotations

import json
import os
import tempfile

from .. import storage
from .layout import SIGNAL_FRACTIONS, make_layout
from .pyramid import write_pyramidal_tiff
from .render import TilePainter


def write_synthetic_slide(path: str, width_px: int = 2816, height_px: int = 2816, mpp: float = 0.5,
                          label: int | None = None, seed: int = 0, signal_strength: float = 1.0,
                          tile_px: int = 256, *, color_shift=(1.0, 1.0, 1.0), tissue_share: float = 0.45,
                          jpeg_quality: int = 90, signal_fractions=SIGNAL_FRACTIONS, write_mpp: bool = True,
                          level_step: int = 2) -> str:
    """Write a pyramidal tiled JPEG TIFF (OpenSlide "generic-tiff", ``openslide.mpp-x`` = ``mpp``).

    ``label`` (0..3 or None): the planted pattern (dark-brown speckled clusters) marks a share
    ``signal_fractions[label]`` of the 128 um tissue cells; None plants nothing.
    ``signal_strength`` (0..1): opacity of the pattern. ``color_shift``: per-channel optical-density
    factors (a mild per-centre stain shift; 1 = none). ``tissue_share``: area share of tissue.
    ``level_step=4`` stores a 1/4/16 pyramid (as 40x Aperio scans have) instead of 1/2/4.
    ``write_mpp=False`` leaves the resolution tags out (a slide without MPP, as some exports are).
    ``path`` may be a local path or any fsspec URL (written locally, then uploaded). Returns ``path``.
    """
    if width_px < 16 or height_px < 16:
        raise ValueError(f"slide must be at least 16 x 16 px, got {width_px} x {height_px}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if label is not None and int(label) not in range(len(signal_fractions)):
        raise ValueError(f"label must be 0..{len(signal_fractions) - 1} or None, got {label!r}")
    layout = make_layout(width_px, height_px, seed=seed, mpp=mpp, label=label, tissue_share=tissue_share,
                         signal_fractions=signal_fractions)
    painter = TilePainter(layout, mpp=mpp, tile_px=tile_px, seed=seed, signal_strength=signal_strength,
                          color_shift=color_shift)
    description = "her2ray synthetic slide " + json.dumps({
        "seed": int(seed), "label": None if label is None else int(label),
        "mpp": float(mpp) if write_mpp else None,
        "signal_strength": float(signal_strength), "marked_cells": int(layout.marked.sum()),
        "color_shift": [float(c) for c in color_shift]})
    kwargs = dict(mpp=mpp if write_mpp else None, tile_px=tile_px, jpeg_quality=jpeg_quality,
                  description=description, level_step=level_step)
    if storage.is_local(str(path)):
        return write_pyramidal_tiff(storage.local_path(str(path)), width_px, height_px, painter, **kwargs)
    with tempfile.TemporaryDirectory(prefix="her2ray-synth-") as tmp:
        local = write_pyramidal_tiff(os.path.join(tmp, os.path.basename(str(path))), width_px, height_px,
                                     painter, **kwargs)
        fs, remote = storage.filesystem_for(str(path))
        fs.put_file(local, remote)  # one PUT / multipart upload: visible only once complete
    return str(path)
