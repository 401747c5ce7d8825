"""The human-readable ``report.md`` next to every ``metrics.json`` (training runs and ``her2ray evaluate``).

The report is rendered only from the metric dicts (never recomputed), so the markdown and the JSON cannot
disagree. Every section is optional: training passes fold summaries, evaluation passes bootstrap CIs,
calibration, per-center results and the slide matching between predictions and labels.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .. import storage
from ..labels import HER2_SCORES

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "auc_macro_ovr": "AUC (macro, one-vs-rest)",
    "f1_micro": "F1 (micro)",
    "f1_macro": "F1 (macro)",
    "qwk": "Quadratic weighted kappa",
}
MAX_IDS_LISTED = 50


def fmt(value: Any, digits: int = 3) -> str:
    """Number -> fixed digits; None -> 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def fmt_ci(ci: Mapping[str, Any] | None) -> str:
    if not ci or ci.get("lo") is None or ci.get("hi") is None:
        return "n/a"
    return f"[{fmt(ci['lo'])}, {fmt(ci['hi'])}]"


def fmt_mean_std(stat: Mapping[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    if stat.get("std") is None:
        return fmt(stat["mean"])
    return f"{fmt(stat['mean'])} ± {fmt(stat['std'])}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _ids(ids: Sequence[str]) -> str:
    shown = ", ".join(f"`{i}`" for i in list(ids)[:MAX_IDS_LISTED])
    more = len(ids) - MAX_IDS_LISTED
    return shown + (f" ... and {more} more (all listed in metrics.json)" if more > 0 else "")


def render_report(metrics: Mapping[str, Any] | None = None, *, title: str = "HER2 scoring report",
                  fold_summary: Mapping[str, Any] | None = None,
                  bootstrap_ci: Mapping[str, Mapping[str, Any]] | None = None,
                  bootstrap_settings: Mapping[str, Any] | None = None,
                  calibration: Mapping[str, Any] | None = None,
                  per_center: Mapping[str, Mapping[str, Any]] | None = None,
                  matching: Mapping[str, Any] | None = None,
                  images: Mapping[str, str] | None = None,
                  provenance: Mapping[str, Any] | None = None,
                  notes: Sequence[str] = (),
                  class_names: Sequence[str] = HER2_SCORES) -> str:
    """Markdown text of the report.

    ``metrics``: a :func:`classification_metrics` dict (e.g. pooled out-of-fold or test predictions);
    ``fold_summary``: :func:`summarize_folds` output (adds a mean ± std column); ``bootstrap_ci``:
    :func:`bootstrap_ci` output (adds a 95% CI column); ``calibration``: :func:`calibration_summary`;
    ``per_center``: {center: metrics dict with optional "bootstrap_ci"}; ``matching``: slide matching counts
    and ids from ``her2ray evaluate``; ``images``: {caption: relative path of a PNG};
    ``provenance``: any JSON-able dict (versions, inputs, config).
    """
    ci = bootstrap_ci or {}
    fs = fold_summary or {}
    base = metrics or {}
    lines = [f"# {title}", ""]

    n = base.get("n", fs.get("n"))
    counts = base.get("class_counts") or fs.get("class_counts") or {}
    if n is not None:
        summary = f"**{n} slides**"
        if counts:
            summary += " (" + ", ".join(f"HER2 {c}: {k}" for c, k in counts.items()) + ")"
        if fs.get("n_folds"):
            summary += f", {fs['n_folds']} folds"
        lines += [summary + ".", ""]
    if bootstrap_settings:
        lines += [f"95% confidence intervals: percentile bootstrap, {bootstrap_settings.get('n_boot')} replicates "
                  f"resampling {bootstrap_settings.get('unit', 'patients')} (seed "
                  f"{bootstrap_settings.get('seed')}).", ""]

    # Headline metrics.
    header = ["Metric"]
    if base:
        header.append("Value")
    if ci:
        header.append("95% CI")
    if fs:
        header.append("Mean ± std over folds")
    rows = []
    for key, label in METRIC_LABELS.items():
        row = [label]
        if base:
            row.append(fmt(base.get(key)))
        if ci:
            row.append(fmt_ci(ci.get(key)))
        if fs:
            row.append(fmt_mean_std(fs.get(key)))
        rows.append(row)
    lines += ["## Metrics", ""] + _table(header, rows)

    # Per-class AUC.
    rows = []
    for name in class_names:
        row = [f"HER2 {name}", counts.get(name, "n/a")]
        if base:
            row.append(fmt((base.get("auc_per_class") or {}).get(name)))
        if ci:
            row.append(fmt_ci(ci.get(f"auc_per_class.{name}")))
        if fs:
            row.append(fmt_mean_std((fs.get("auc_per_class") or {}).get(name)))
        rows.append(row)
    lines += ["## One-vs-rest AUC per class", ""] + _table(["Class", "Slides"] + header[1:], rows)

    # Endpoints.
    endpoints = base.get("endpoints") or fs.get("endpoints") or {}
    if endpoints:
        lines += ["## Clinical endpoints", "",
                  "Derived from the same 4-class probabilities; a slide is called positive when its endpoint "
                  "score is >= the threshold.", ""]
        for name, ep in endpoints.items():
            fs_ep = (fs.get("endpoints") or {}).get(name) or {}
            base_ep = (base.get("endpoints") or {}).get(name) or {}
            lines += [f"### {name}", "", f"{ep.get('description', '')}", ""]
            auc_bits = []
            if base_ep:
                auc = f"AUC {fmt(base_ep.get('auc'))}"
                if ci.get(f"endpoints.{name}.auc"):
                    auc += f" (95% CI {fmt_ci(ci[f'endpoints.{name}.auc'])})"
                auc_bits.append(auc)
                auc_bits.append(f"{base_ep.get('n_positive')} positive / {base_ep.get('n_negative')} negative slides")
            if fs_ep:
                auc_bits.append(f"fold AUC {fmt_mean_std(fs_ep.get('auc'))}")
            lines += ["; ".join(auc_bits) + ".", ""]
            if base_ep.get("operating_points"):
                rows = [[fmt(o["threshold"], 1), fmt(o["fpr"]), fmt(o["fnr"]), o["tp"], o["fp"], o["tn"], o["fn"]]
                        for o in base_ep["operating_points"]]
                lines += _table(["Threshold", "FPR", "FNR", "TP", "FP", "TN", "FN"], rows)
            elif fs_ep.get("operating_points"):
                rows = [[fmt(o["threshold"], 1), fmt_mean_std(o["fpr"]), fmt_mean_std(o["fnr"])]
                        for o in fs_ep["operating_points"]]
                lines += _table(["Threshold", "FPR (mean ± std)", "FNR (mean ± std)"], rows)

    # Confusion matrix.
    cm = base.get("confusion_matrix") or fs.get("confusion_matrix")
    if cm:
        rows = [[f"**{class_names[i]}**", *row, sum(row)] for i, row in enumerate(cm)]
        lines += ["## Confusion matrix", "", "Rows = truth, columns = prediction"
                  + (" (pooled over folds)." if not base and fs else "."), ""]
        lines += _table(["Truth \\ Predicted", *class_names, "Total"], rows)

    if calibration:
        lines += ["## Calibration", "",
                  f"Top-label expected calibration error (ECE, {calibration.get('n_bins')} equal-width bins): "
                  f"**{fmt(calibration.get('ece'))}**; multi-class Brier score: {fmt(calibration.get('brier'))}.", ""]
        rows = [[f"{fmt(b['lo'], 1)}-{fmt(b['hi'], 1)}", b["count"], fmt(b["confidence"]), fmt(b["accuracy"])]
                for b in calibration.get("bins", []) if b["count"]]
        lines += _table(["Confidence bin", "Slides", "Mean confidence", "Accuracy"], rows)

    if per_center:
        keys = ("accuracy", "auc_macro_ovr", "f1_macro", "qwk")
        rows = []
        for center, m in per_center.items():
            cci = m.get("bootstrap_ci") or {}
            rows.append([center, m.get("n")] + [
                fmt(m.get(k)) + (f" {fmt_ci(cci.get(k))}" if cci.get(k) else "") for k in keys])
        lines += ["## Per center", "", "Values with 95% patient-level bootstrap CIs.", ""]
        lines += _table(["Center", "Slides", *(METRIC_LABELS[k] for k in keys)], rows)

    if matching:
        lines += ["## Slides evaluated", ""]
        lines += [f"- evaluated (prediction and label): **{matching.get('n_evaluated')}**",
                  f"- rows in predictions: {matching.get('n_predictions')}; labelled slides in manifest: "
                  f"{matching.get('n_labelled')}"]
        for key, label in (("predictions_without_label", "predictions without a label (not evaluated)"),
                           ("labels_without_prediction", "labelled slides without a prediction (not evaluated)"),
                           ("unscored_predictions", "prediction rows without probabilities (failed scoring)"),
                           ("unlabelled_in_manifest", "manifest rows with an empty her2_score")):
            ids = matching.get(key) or []
            if ids:
                lines.append(f"- {label}: **{len(ids)}**: {_ids(ids)}")
        lines.append("")

    if images:
        lines += ["## Figures", ""]
        for caption, path in images.items():
            lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]

    all_notes = list(notes) + list(base.get("notes") or []) + list(fs.get("notes") or [])
    if all_notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(all_notes)] + [""]

    if provenance:
        lines += ["## Provenance", "", "```json",
                  json.dumps(provenance, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def write_report(url: str, text: str) -> str:
    """Write ``report.md`` atomically (local or object store); returns ``url``."""
    storage.write_text_atomic(str(url), text if text.endswith("\n") else text + "\n")
    return str(url)
