"""Attention heatmap PNG: the slide thumbnail and the attention overlay side by side, colour bar, prediction title.

Why this layout: a pathologist must see the tissue unobstructed next to where the model looked, at the same
scale, to judge whether the attention sits on tumour or on artefacts. Both panels are placed at exact pixel
sizes (the thumbnail's), so the overlay is never stretched and the PNG can be measured (``HeatmapLayout``).

Colours: a perceptually uniform map (viridis by default: its blue-green-yellow stands out on pink/purple H&E;
magma, inferno, cividis work too). Two colour scales:
``slide`` rescales each slide's scores (min-max by default; ``rank`` gives percentiles, robust to one extreme
tile); ``cohort`` shows attention relative to the slide's mean tile on one fixed range for every slide, so slides
can be compared side by side. The overlay's opacity grows with attention (low attention leaves the tissue
visible), there is no overlay where there is no tile or, given a tissue mask, off tissue. Panels are labelled,
a scale bar (um) is drawn when the slide's MPP is known, and random-weight runs are stamped RANDOM WEIGHTS.
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


def prediction_title(slide_id: str, prediction: dict[str, Any] | None, truth: str | None = None) -> str:
    """``<slide>: predicted HER2 2+ (HER2-low) | true HER2 3+`` + probabilities (slide id alone if unknown)."""
    true_txt = f"  |  true HER2 {truth}" if truth not in (None, "") else ""
    if not prediction or not prediction.get("pred_score"):
        return f"{slide_id}: attention (no prediction given){true_txt}"
    pred = str(prediction["pred_score"])
    low = " (HER2-low)" if pred in ("1+", "2+") else ""
    low += true_txt
    probs = "  ".join(f"P({s})={float(prediction[c]):.2f}" for s, c in zip(HER2_SCORES, PROB_COLUMNS)
                      if prediction.get(c) is not None)
    std = prediction.get("fold_std")
    std_txt = f"  fold std {float(std):.2f}" if std is not None and np.isfinite(float(std)) else ""
    return f"{slide_id}: predicted HER2 {pred}{low}\n{probs}{std_txt}"


SCALES = ("slide", "cohort")
NICE_UM = (10, 20, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000)
RANDOM_WEIGHTS_STAMP = "RANDOM WEIGHTS - pipeline demo, not a diagnosis"


def relative_attention(scores: np.ndarray) -> np.ndarray:
    """Attention relative to the slide's mean tile (1 = average tile): comparable across slides of any size."""
    s = np.asarray(scores, dtype=np.float64)
    mean = np.nanmean(s) if np.isfinite(s).any() else np.nan
    return s / mean if np.isfinite(mean) and mean > 0 else np.full(s.shape, np.nan)


def scale_bar_um(um_per_px: float, panel_w_px: int, target_fraction: float = 0.2) -> tuple[float, int]:
    """(length in um, length in px) of a round scale bar close to ``target_fraction`` of the panel width."""
    want = um_per_px * panel_w_px * target_fraction
    um = min(NICE_UM, key=lambda v: abs(np.log(v / want)))
    return float(um), max(1, int(round(um / um_per_px)))


def _um_label(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} \u00b5m"


def overlay_rgba(grid: np.ndarray, cmap: str, alpha: float, tissue: np.ndarray | None = None) -> np.ndarray:
    """RGBA overlay of a [0, 1] grid: opacity grows with attention (low attention = see-through), zero where
    there is no tile (NaN) and, when a tissue mask is given, zero off tissue."""
    from matplotlib import colormaps

    v = np.clip(np.nan_to_num(grid, nan=0.0), 0.0, 1.0)
    rgba = colormaps[cmap](v)
    a = alpha * v
    a[~np.isfinite(grid)] = 0.0
    if tissue is not None:
        a = a * np.asarray(tissue, dtype=bool)
    rgba[..., 3] = a
    return rgba


def render_heatmap(thumbnail: np.ndarray, slide_dims: tuple[int, int], x: np.ndarray, y: np.ndarray,
                   scores: np.ndarray, tile_size: float, title: str = "", cmap: str = "viridis",
                   alpha: float = 0.6, normalize: str = "minmax", *, slide_mpp: float | None = None,
                   value_range: tuple[float, float] | None = None, tissue: np.ndarray | None = None,
                   random_weights: bool = False) -> tuple[bytes, HeatmapLayout]:
    """PNG bytes and the panel layout. Each panel is exactly the thumbnail's size in pixels.

    ``value_range``: a fixed (lo, hi) for the colours (cohort scale: ``scores`` are then relative attention,
    see ``relative_attention``); None = per-slide ``normalize``. ``slide_mpp`` (level-0 um/px) draws a scale
    bar; ``tissue`` (bool mask at thumbnail size) hides the overlay off tissue; ``random_weights`` stamps the
    image so a demo picture can never pass for a real result.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    thumb = np.asarray(thumbnail)
    th, tw = thumb.shape[:2]
    if value_range is None:
        shown = normalize_scores(scores, normalize)
        norm = Normalize(0.0, 1.0)
        bar_label = {"minmax": "attention (min-max, this slide)", "rank": "attention (percentile, this slide)",
                     "none": "attention"}[normalize]
    else:
        lo, hi = float(value_range[0]), float(value_range[1])
        hi = hi if hi > lo else lo + 1.0
        shown = np.clip((np.asarray(scores, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
        norm = Normalize(lo, hi)
        bar_label = "attention / slide mean (cohort scale)"
    grid = score_grid(x, y, shown, tile_size, slide_dims, (th, tw))
    if tissue is not None and tuple(np.shape(tissue)) != (th, tw):
        tissue = None

    # text grows with the thumbnail so titles stay legible when the PNG is viewed scaled to a screen
    text_scale = max(1.0, max(th, tw) / 600)
    pad, gap = 12, 16
    cbar_w, cbar_labels = int(18 * text_scale), int(64 * text_scale)
    n_title_lines = (title.count("\n") + 1 if title else 0) + (1 if random_weights else 0)
    label_h = int(20 * text_scale)
    title_h = int((14 + 17 * n_title_lines) * text_scale) + label_h
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
    ax_h.imshow(overlay_rgba(grid, cmap, alpha, tissue), interpolation="nearest", aspect="auto")
    for ax, label in ((ax_t, "H&E (thumbnail)"), (ax_h, "attention: where the model looked")):
        ax.set_axis_off()
        ax.text(0.0, 1.0 + 4 / th, label, transform=ax.transAxes, ha="left", va="bottom",
                fontsize=9 * text_scale, fontweight="bold")
    if slide_mpp and slide_mpp > 0:
        um_per_px = float(slide_mpp) * slide_dims[0] / tw
        um, px = scale_bar_um(um_per_px, tw)
        for ax in (ax_t, ax_h):
            x0, y0 = 0.04 * tw, th - 0.05 * th
            ax.plot([x0, x0 + px], [y0, y0], color="black", linewidth=4 * text_scale, solid_capstyle="butt")
            ax.text(x0 + px / 2, y0 - 0.015 * th, _um_label(um), ha="center", va="bottom", color="black",
                    fontsize=8 * text_scale, bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none",
                                                   "pad": 1.5})
            ax.set_xlim(-0.5, tw - 0.5)
            ax.set_ylim(th - 0.5, -0.5)
    ax_c = axes(cbar_box)
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=colormaps[cmap])
    cb = fig.colorbar(sm, cax=ax_c)
    cb.set_label(bar_label, fontsize=8 * text_scale)
    cb.ax.tick_params(labelsize=7 * text_scale)
    top = 1 - 6 / fig_h
    if random_weights:
        fig.text(0.5, top, RANDOM_WEIGHTS_STAMP, ha="center", va="top", fontsize=10 * text_scale,
                 fontweight="bold", color="white", bbox={"facecolor": "#c0392b", "edgecolor": "none", "pad": 3})
        top -= 21 * text_scale / fig_h
    if title:
        fig.text(0.5, top, title, ha="center", va="top", fontsize=9 * text_scale)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    layout = HeatmapLayout(width=int(round(fig_w)), height=int(round(fig_h)), thumbnail_box=thumb_box,
                           heatmap_box=heat_box, colorbar_box=cbar_box)
    return buf.getvalue(), layout


__all__ = ["HeatmapLayout", "PERCEPTUAL_CMAPS", "RANDOM_WEIGHTS_STAMP", "SCALES", "normalize_scores",
           "overlay_rgba", "prediction_title", "relative_attention", "render_heatmap", "scale_bar_um", "score_grid"]

