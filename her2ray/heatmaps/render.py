"""Attention heatmap PNG: the slide thumbnail and the attention overlay side by side, colour bar, prediction title.

Why this layout: a pathologist must see the tissue unobstructed next to where the model looked, at the same
scale, to judge whether the attention sits on tumour or on artefacts. Both panels are placed at exact pixel
sizes (the thumbnail's), so the overlay is never stretched and the PNG can be measured (``HeatmapLayout``).

Colours: a perceptually uniform map (magma by default; viridis, inferno, cividis work too). Scores are
rescaled per slide (min-max by default; ``rank`` gives percentiles, robust to one extreme tile), because
attention is relative within a slide and not comparable across slides. Tiles without a score stay clear.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..labels import HER2_SCORES, PROB_COLUMNS

PERCEPTUAL_CMAPS = ("magma", "viridis", "inferno", "plasma", "cividis")


@dataclass(frozen=True)
class HeatmapLayout:
    """Pixel boxes (left, top, width, height) in the PNG, origin top-left."""

    width: int
    height: int
    thumbnail_box: tuple[int, int, int, int]
    heatmap_box: tuple[int, int, int, int]
    colorbar_box: tuple[int, int, int, int]


def normalize_scores(scores: np.ndarray, method: str = "minmax") -> np.ndarray:
    """Per-slide display scale in [0, 1]: ``minmax``, ``rank`` (percentile) or ``none`` (clipped as is)."""
    s = np.asarray(scores, dtype=np.float64)
    out = np.full(s.shape, np.nan)
    ok = np.isfinite(s)
    if not ok.any():
        return out
    v = s[ok]
    if method == "minmax":
        lo, hi = v.min(), v.max()
        out[ok] = (v - lo) / (hi - lo) if hi > lo else 0.5
    elif method == "rank":
        order = np.argsort(np.argsort(v, kind="stable"), kind="stable")
        out[ok] = order / max(len(v) - 1, 1)
    elif method == "none":
        out[ok] = np.clip(v, 0.0, 1.0)
    else:
        raise ValueError(f"unknown normalization {method!r}; use minmax, rank or none")
    return out


def score_grid(x: np.ndarray, y: np.ndarray, values: np.ndarray, tile_size: float,
               slide_dims: tuple[int, int], grid_shape: tuple[int, int]) -> np.ndarray:
    """Paint tile values into an image of ``grid_shape`` (h, w) covering the slide; NaN where no tile.

    Tiles are squares of ``tile_size`` level-0 px at (x, y); overlapping tiles keep the larger value.
    """
    h, w = grid_shape
    sx, sy = w / float(slide_dims[0]), h / float(slide_dims[1])
    grid = np.full((h, w), np.nan)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    # floor/ceil: a tile covers every thumbnail pixel it touches, so neighbours never leave a 1-px seam
    # (tile positions are rounded level-0 px on a fractional stride); shared edge pixels take the max.
    eps = 1e-6
    x0 = np.clip(np.floor(x * sx + eps), 0, w).astype(int)
    y0 = np.clip(np.floor(y * sy + eps), 0, h).astype(int)
    x1 = np.clip(np.maximum(np.ceil((x + tile_size) * sx - eps), x0 + 1), 0, w).astype(int)
    y1 = np.clip(np.maximum(np.ceil((y + tile_size) * sy - eps), y0 + 1), 0, h).astype(int)
    for a, b, c, d, v in zip(y0, y1, x0, x1, np.asarray(values, dtype=np.float64)):
        if not np.isfinite(v) or a >= b or c >= d:
            continue
        grid[a:b, c:d] = np.fmax(grid[a:b, c:d], v)
    return grid


def prediction_title(slide_id: str, prediction: dict[str, Any] | None) -> str:
    """``<slide>: predicted 2+ (HER2-low) | P(0)=.. P(1+)=.. P(2+)=.. P(3+)=..`` (slide id alone if unknown)."""
    if not prediction or not prediction.get("pred_score"):
        return f"{slide_id}: attention (no prediction given)"
    pred = str(prediction["pred_score"])
    low = " (HER2-low)" if pred in ("1+", "2+") else ""
    probs = "  ".join(f"P({s})={float(prediction[c]):.2f}" for s, c in zip(HER2_SCORES, PROB_COLUMNS)
                      if prediction.get(c) is not None)
    std = prediction.get("fold_std")
    std_txt = f"  fold std {float(std):.2f}" if std is not None and np.isfinite(float(std)) else ""
    return f"{slide_id}: predicted HER2 {pred}{low}\n{probs}{std_txt}"


def render_heatmap(thumbnail: np.ndarray, slide_dims: tuple[int, int], x: np.ndarray, y: np.ndarray,
                   scores: np.ndarray, tile_size: float, title: str = "", cmap: str = "magma",
                   alpha: float = 0.6, normalize: str = "minmax") -> tuple[bytes, HeatmapLayout]:
    """PNG bytes and the panel layout. Each panel is exactly the thumbnail's size in pixels."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    thumb = np.asarray(thumbnail)
    th, tw = thumb.shape[:2]
    grid = score_grid(x, y, normalize_scores(scores, normalize), tile_size, slide_dims, (th, tw))
    colormap = colormaps[cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))   # no tile -> tissue shows through

    # text grows with the thumbnail so titles stay legible when the PNG is viewed scaled to a screen
    text_scale = max(1.0, max(th, tw) / 600)
    pad, gap = 12, 16
    cbar_w, cbar_labels = int(18 * text_scale), int(64 * text_scale)
    title_h = int((58 if "\n" in title else 36) * text_scale)
    fig_w = pad + tw + gap + tw + gap + cbar_w + cbar_labels
    fig_h = title_h + th + pad
    thumb_box = (pad, title_h, tw, th)
    heat_box = (pad + tw + gap, title_h, tw, th)
    cbar_box = (pad + 2 * tw + 2 * gap, title_h, cbar_w, th)

    dpi = 100
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")

    def axes(box):
        left, top, width, height = box
        return fig.add_axes((left / fig_w, 1 - (top + height) / fig_h, width / fig_w, height / fig_h))

    ax_t = axes(thumb_box)
    ax_t.imshow(thumb, interpolation="nearest", aspect="auto")
    ax_h = axes(heat_box)
    ax_h.imshow(thumb, interpolation="nearest", aspect="auto")
    ax_h.imshow(np.ma.masked_invalid(grid), cmap=colormap, norm=Normalize(0.0, 1.0), alpha=alpha,
                interpolation="nearest", aspect="auto")
    for ax in (ax_t, ax_h):
        ax.set_axis_off()
    ax_c = axes(cbar_box)
    sm = matplotlib.cm.ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormaps[cmap])
    cb = fig.colorbar(sm, cax=ax_c)
    cb.set_label({"minmax": "attention (min-max per slide)", "rank": "attention (percentile per slide)",
                  "none": "attention"}[normalize], fontsize=8 * text_scale)
    cb.ax.tick_params(labelsize=7 * text_scale)
    if title:
        fig.text(0.5, 1 - 6 / fig_h, title, ha="center", va="top", fontsize=9 * text_scale)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    layout = HeatmapLayout(width=int(round(fig_w)), height=int(round(fig_h)), thumbnail_box=thumb_box,
                           heatmap_box=heat_box, colorbar_box=cbar_box)
    return buf.getvalue(), layout


__all__ = ["HeatmapLayout", "PERCEPTUAL_CMAPS", "normalize_scores", "prediction_title", "render_heatmap",
           "score_grid"]

