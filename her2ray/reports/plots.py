"""Report figures as PNG files (matplotlib, Agg backend, no pyplot global state).

Each function draws one figure, writes it to ``out_url`` (local path or ``s3://...``, atomically via
:mod:`her2ray.storage`) and returns ``out_url``. We build ``matplotlib.figure.Figure`` objects directly
instead of using ``pyplot`` so plotting is safe in Ray workers and threads and never needs a display.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from .. import storage
from ..labels import HER2_SCORES
from .metrics import validate_inputs

CLASS_COLORS = ("#1f77b4", "#2ca02c", "#ff7f0e", "#d62728")  # 0, 1+, 2+, 3+
DPI = 120


def _save(fig: Figure, out_url: str) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    storage.write_bytes_atomic(str(out_url), buf.getvalue())
    return str(out_url)


def roc_curves_png(y_true: Any, probs: Any, out_url: str, *, title: str = "One-vs-rest ROC per HER2 score",
                   class_names: Sequence[str] = HER2_SCORES) -> str:
    """Per-class one-vs-rest ROC curves, AUC in the legend (classes absent from the truth are listed as n/a)."""
    fig = Figure(figsize=(5.5, 5.0))
    _draw_roc(fig.add_subplot(1, 1, 1), y_true, probs, title, class_names)
    return _save(fig, out_url)


def roc_grid_png(panels: Sequence[Sequence[tuple[str, Any, Any] | None]], out_url: str, *,
                 class_names: Sequence[str] = HER2_SCORES) -> str:
    """A grid of per-class ROC panels: ``panels[row][col] = (title, y_true, probs)`` or None (empty cell)."""
    rows, cols = len(panels), max(len(r) for r in panels)
    fig = Figure(figsize=(4.6 * cols, 4.4 * rows))
    for i, row in enumerate(panels):
        for j, cell in enumerate(row):
            ax = fig.add_subplot(rows, cols, i * cols + j + 1)
            if cell is None:
                ax.set_axis_off()
                continue
            _draw_roc(ax, cell[1], cell[2], cell[0], class_names, fontsize=7)
    return _save(fig, out_url)


def _draw_roc(ax, y_true: Any, probs: Any, title: str, class_names: Sequence[str], fontsize: int = 9) -> None:
    y, p = validate_inputs(y_true, probs, len(class_names))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for k, name in enumerate(class_names):
        y_bin = (y == k).astype(int)
        color = CLASS_COLORS[k % len(CLASS_COLORS)]
        if 0 < y_bin.sum() < y_bin.size:
            fpr, tpr, _ = roc_curve(y_bin, p[:, k])
            auc = float(np.trapezoid(tpr, fpr))
            ax.plot(fpr, tpr, color=color, linewidth=2, label=f"HER2 {name}: AUC = {auc:.3f} (n={y_bin.sum()})")
        else:
            ax.plot([], [], color=color, label=f"HER2 {name}: AUC n/a (n={y_bin.sum()})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title, fontsize=fontsize + 1)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=fontsize)


def confusion_png(confusion: Any, out_url: str, *, class_names: Sequence[str] = HER2_SCORES,
                  title: str = "Confusion matrix") -> str:
    """Two panels: counts and row-normalised (per-truth recall); rows = truth, columns = prediction."""
    cm = np.asarray(confusion, dtype=np.float64)
    row = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, row, out=np.zeros_like(cm), where=row > 0)
    fig = Figure(figsize=(10.0, 4.4))
    labels = [f"HER2 {c}" for c in class_names]
    for i, (mat, sub, fmt) in enumerate(((cm, "counts", "{:.0f}"), (norm, "row-normalised", "{:.2f}"))):
        ax = fig.add_subplot(1, 2, i + 1)
        vmax = mat.max() if mat.max() > 0 else 1.0
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=vmax)
        for r in range(mat.shape[0]):
            for c in range(mat.shape[1]):
                ax.text(c, r, fmt.format(mat[r, c]), ha="center", va="center",
                        color="white" if mat[r, c] > 0.6 * vmax else "black", fontsize=10)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("Truth")
        ax.set_title(f"{title} ({sub})")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, out_url)


def _histories(histories: Any) -> dict[str, list[Mapping[str, Any]]]:
    """Accept {fold: [epoch dicts]}, [[epoch dicts] per fold] or a flat list of epoch dicts with "fold"."""
    if isinstance(histories, Mapping):
        return {str(k): list(v) for k, v in histories.items()}
    items = list(histories)
    if items and isinstance(items[0], Mapping):
        out: dict[str, list[Mapping[str, Any]]] = {}
        for rec in items:
            out.setdefault(str(rec.get("fold", 0)), []).append(rec)
        return out
    return {str(i): list(v) for i, v in enumerate(items)}


def training_curves_png(histories: Any, out_url: str, *, loss_keys: Sequence[str] = ("train_loss", "val_loss"),
                        metric_key: str = "val_auc", metric_label: str = "Validation AUC (macro OvR)",
                        title: str = "Training curves per fold") -> str:
    """Loss (left) and a validation metric (right) against epoch, one colour per fold.

    ``histories``: ``{fold: [{"epoch", "train_loss", "val_loss", "val_auc", ...}, ...]}``, a list of such lists,
    or a flat list of per-epoch dicts carrying ``"fold"``. Missing keys/None values are skipped; the epoch
    defaults to the position in the list.
    """
    per_fold = _histories(histories)
    fig = Figure(figsize=(11.0, 4.2))
    ax_loss = fig.add_subplot(1, 2, 1)
    ax_metric = fig.add_subplot(1, 2, 2)
    styles = {k: s for k, s in zip(loss_keys, ("-", "--", ":", "-."))}
    cmap = [f"C{i % 10}" for i in range(len(per_fold))]
    for color, (fold, recs) in zip(cmap, per_fold.items()):
        epochs = [r.get("epoch", i) for i, r in enumerate(recs)]
        for key in loss_keys:
            pts = [(e, r[key]) for e, r in zip(epochs, recs) if r.get(key) is not None]
            if pts:
                ax_loss.plot(*zip(*pts), linestyle=styles[key], color=color, marker=".",
                             label=f"fold {fold} {key.replace('_', ' ')}")
        pts = [(e, r[metric_key]) for e, r in zip(epochs, recs) if r.get(metric_key) is not None]
        if pts:
            ax_metric.plot(*zip(*pts), color=color, marker="o", markersize=3, label=f"fold {fold}")
    ax_loss.set_xlabel("Epoch")
    ax_loss.set_ylabel("Cross-entropy loss")
    ax_loss.set_title("Loss")
    ax_metric.set_xlabel("Epoch")
    ax_metric.set_ylabel(metric_label)
    ax_metric.set_title(metric_label)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_url)


def calibration_png(calibration: Mapping[str, Any], out_url: str, *,
                    title: str = "Reliability diagram (top-label)") -> str:
    """Reliability diagram from :func:`calibration_summary`: accuracy vs confidence per bin, ECE in the title,
    plus a histogram of how many slides fall in each bin."""
    bins = calibration["bins"]
    fig = Figure(figsize=(5.5, 6.5))
    ax = fig.add_axes((0.14, 0.36, 0.8, 0.56))
    ax_hist = fig.add_axes((0.14, 0.08, 0.8, 0.18), sharex=ax)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    filled = [b for b in bins if b["count"]]
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 0.1
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in filled], [b["accuracy"] for b in filled], width=width * 0.9,
           color="#1f77b4", alpha=0.7, edgecolor="black", label="observed accuracy")
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o-", color="#d62728",
            label="mean confidence vs accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Observed accuracy")
    ece = calibration.get("ece")
    ax.set_title(f"{title}\nECE = {ece:.3f}" if ece is not None else title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    ax_hist.bar(centers, [b["count"] for b in bins], width=width * 0.9, color="grey")
    ax_hist.set_xlabel("Confidence (top-class probability)")
    ax_hist.set_ylabel("Slides")
    return _save(fig, out_url)


def per_center_png(per_center: Mapping[str, Mapping[str, Any]], out_url: str, *,
                   metric_keys: Sequence[str] = ("accuracy", "auc_macro_ovr", "f1_macro", "qwk"),
                   title: str = "Metrics per center (95% bootstrap CI)") -> str:
    """Grouped bars: one group per center, one bar per metric, error bars = bootstrap CI.

    ``per_center``: ``{center: {"bootstrap_ci": {key: {estimate, lo, hi}}, key: value, "n": ...}}``; a metric
    without a CI is drawn without an error bar, an undefined one is left out.
    """
    from .markdown import METRIC_LABELS

    centers = list(per_center)
    fig = Figure(figsize=(max(6.0, 1.6 * len(centers) + 3.5), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(metric_keys))
    x = np.arange(len(centers))
    lowest = 0.0
    for j, key in enumerate(metric_keys):
        vals, lo_err, hi_err = [], [], []
        for c in centers:
            m = per_center[c]
            ci = (m.get("bootstrap_ci") or {}).get(key) or {}
            est = ci.get("estimate", m.get(key))
            vals.append(np.nan if est is None else est)
            lo, hi = ci.get("lo"), ci.get("hi")
            lo_err.append(max(0.0, est - lo) if est is not None and lo is not None else 0.0)
            hi_err.append(max(0.0, hi - est) if est is not None and hi is not None else 0.0)
            lowest = min([lowest] + [v for v in (est, lo) if v is not None])
        ax.bar(x + (j - (len(metric_keys) - 1) / 2) * width, vals, width * 0.95, yerr=[lo_err, hi_err],
               capsize=3, color=f"C{j}", label=METRIC_LABELS.get(key, key))
    ax.set_xticks(x, [f"{c}\n(n={per_center[c].get('n', '?')})" for c in centers])
    ax.set_ylim(lowest - 0.05, 1.05)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("Metric value")
    ax.set_xlabel("Center")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, out_url)
