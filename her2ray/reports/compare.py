"""``her2ray compare``: the paper's Table 2 from finished ``her2ray train`` runs, with a paired model comparison.

Input: ``SETTING=RUN`` pairs. A setting whose name starts with ``cv`` reads the run's cross-validation
(validation folds, out-of-fold predictions); any other setting reads the run's held-out test set (per-fold test
metrics, fold-ensemble predictions). So one ``--train-centers A --test-centers B`` run gives both ``cv_a`` and
``a_to_b``. The model comes from the run's own ``metrics.json``.

Per (model, setting): ACC, macro one-vs-rest AUC and macro F1 as mean ± std over folds (sample std, ddof 1),
beside the numbers Du et al. (Breast Cancer Research 2025, Table 2) published for the settings ``cv_a``
(their in-house USTC-BC cohort), ``cv_b`` (TCGA-BRCA) and ``a_to_b`` (USTC-BC -> TCGA-BRCA). Only their
AUCs are recorded here (the ACC and F1 columns of their table could not be read from a public copy).

Paired comparison, for every setting with two models: the per-fold AUC differences (same folds: the runs'
``splits.parquet`` must agree, else the comparison says so) and a paired patient-level bootstrap of the macro
AUC difference on the same slides (out-of-fold or test-ensemble predictions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import storage
from ..errors import ConfigError
from ..labels import PROB_COLUMNS, parse_her2_score
from .bootstrap import paired_bootstrap_diff
from .markdown import fmt, fmt_mean_std

METRICS = (("accuracy", "ACC"), ("auc_macro_ovr", "AUC"), ("f1_macro", "F1"))
#: Du et al. 2025, Table 2 / abstract: macro AUC (mean ± std where the std is published).
PUBLISHED_AUC: dict[str, dict[str, tuple[float, float | None]]] = {
    "kat": {"cv_a": (0.795, 0.028), "cv_b": (0.688, 0.008), "a_to_b": (0.579, None)},
    "slidegraph": {"cv_a": (0.768, None), "cv_b": (0.654, None), "a_to_b": (0.564, None)},
}
SETTING_TITLES = {"cv_a": "CV on cohort A (paper: in-house USTC-BC)", "cv_b": "CV on cohort B (paper: TCGA-BRCA)",
                  "a_to_b": "Train A, test B (paper: USTC-BC -> TCGA-BRCA)"}
MODEL_TITLES = {"kat": "KAT", "slidegraph": "SlideGraph+", "abmil": "ABMIL"}


@dataclass
class RunPart:
    """One model's results in one setting."""

    setting: str
    model: str
    run: str
    part: str                              # "cv" or "test"
    fold_metrics: list[dict[str, Any]]
    slide_ids: list[str]
    groups: list[str]
    y: np.ndarray
    probs: np.ndarray
    fold_probs: dict[int, np.ndarray]      # test part only: each fold model's probabilities
    splits: dict[str, int]


def parse_spec(spec: str) -> tuple[str, str]:
    """``SETTING=RUN`` -> (setting, run); the setting is letters, digits and '_' only."""
    setting, sep, run = spec.partition("=")
    if not sep or not setting or not run or not setting.replace("_", "").isalnum():
        raise ConfigError(f"expected SETTING=RUN (e.g. cv_a=runs/kat_a), got {spec!r}")
    return setting, run


def load_part(setting: str, run: str) -> RunPart:
    url = storage.join(run, "metrics.json")
    if not storage.exists(url):
        raise ConfigError(f"{run}: no metrics.json (not a finished `her2ray train` run folder)")
    metrics = json.loads(storage.read_text(url))
    part = "cv" if setting.startswith("cv") else "test"
    if part == "test" and not metrics.get("test"):
        raise ConfigError(f"{run}: setting {setting!r} needs a held-out test set, but the run has none "
                          "(name CV settings cv_*)")
    key = "val" if part == "cv" else "test"
    folds = [f[key] for f in metrics["folds"] if f.get(key)]
    table = storage.read_parquet(storage.join(run, "oof_predictions.parquet" if part == "cv"
                                              else "test_predictions.parquet")).to_pylist()
    y = np.array([parse_her2_score(r["her2_score"]) for r in table], dtype=np.int64)
    probs = np.array([[r[c] for c in PROB_COLUMNS] for r in table], dtype=np.float64).reshape(-1, len(PROB_COLUMNS))
    fold_probs: dict[int, np.ndarray] = {}
    if part == "test":
        for f in metrics["folds"]:
            k = int(f["fold"])
            fold_probs[k] = np.array([[r[f"fold{k}_{c}"] for c in PROB_COLUMNS] for r in table], dtype=np.float64)
    splits = {r["slide_id"]: int(r["fold"]) for r in storage.read_parquet(storage.join(run, "splits.parquet"))
              .to_pylist()} if storage.exists(storage.join(run, "splits.parquet")) else {}
    return RunPart(setting=setting, model=str(metrics.get("model", "?")), run=run, part=part, fold_metrics=folds,
                   slide_ids=[r["slide_id"] for r in table],
                   groups=[str(r.get("patient_id") or r["slide_id"]) for r in table], y=y, probs=probs,
                   fold_probs=fold_probs, splits=splits)


def summarize(part: RunPart) -> dict[str, Any]:
    out: dict[str, Any] = {"setting": part.setting, "model": part.model, "run": part.run, "part": part.part,
                           "n_folds": len(part.fold_metrics), "n_slides": int(part.y.size)}
    for key, _ in METRICS:
        vals = [f.get(key) for f in part.fold_metrics if f.get(key) is not None]
        out[key] = {"mean": float(np.mean(vals)) if vals else None,
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "per_fold": vals}
    pub = PUBLISHED_AUC.get(part.model, {}).get(part.setting)
    out["published_auc"] = None if pub is None else {"mean": pub[0], "std": pub[1]}
    return out


def _fold_aucs(part: RunPart) -> dict[int, float | None]:
    if part.part == "test":
        from .metrics import classification_metrics

        return {k: classification_metrics(part.y, p)["auc_macro_ovr"] for k, p in part.fold_probs.items()}
    return {i: f.get("auc_macro_ovr") for i, f in enumerate(part.fold_metrics)}


def paired(a: RunPart, b: RunPart, n_boot: int, seed: int) -> dict[str, Any]:
    """Model a minus model b in one setting: per-fold AUC differences and a paired bootstrap on the same slides."""
    out: dict[str, Any] = {"setting": a.setting, "a": a.model, "b": b.model}
    same_folds = bool(a.splits) and a.splits == b.splits
    out["same_folds"] = same_folds
    fa, fb = _fold_aucs(a), _fold_aucs(b)
    diffs = [fa[k] - fb[k] for k in sorted(fa) if k in fb and fa[k] is not None and fb[k] is not None]
    out["fold_auc_diff"] = {"mean": float(np.mean(diffs)) if diffs else None,
                            "std": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
                            "per_fold": diffs, "a_better": int(sum(d > 0 for d in diffs))} if same_folds else None
    ib = {s: i for i, s in enumerate(b.slide_ids)}
    common = [s for s in a.slide_ids if s in ib]
    out["n_common_slides"] = len(common)
    if len(common) < len(a.slide_ids) or len(common) < len(b.slide_ids):
        out["note"] = (f"runs share {len(common)} of {len(a.slide_ids)}/{len(b.slide_ids)} slides; "
                       "bootstrap on the shared slides")
    ia = {s: i for i, s in enumerate(a.slide_ids)}
    rows_a, rows_b = [ia[s] for s in common], [ib[s] for s in common]
    if not common or not np.array_equal(a.y[rows_a], b.y[rows_b]):
        out["bootstrap"] = None
        out["note"] = "labels differ between the runs; no paired comparison"
        return out
    out["bootstrap"] = paired_bootstrap_diff(a.y[rows_a], a.probs[rows_a], b.probs[rows_b],
                                             groups=[a.groups[i] for i in rows_a], n_boot=n_boot, seed=seed)
    return out


def compare_runs(specs: list[str], out: str, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Write ``table2.md``, ``compare.json`` and ``roc_compare.png`` under ``out``; return the JSON dict."""
    from .plots import roc_grid_png

    parts = [load_part(*parse_spec(s)) for s in specs]
    seen = set()
    for p in parts:
        if (p.model, p.setting) in seen:
            raise ConfigError(f"two runs for model {p.model} in setting {p.setting}")
        seen.add((p.model, p.setting))
    settings = list(dict.fromkeys(p.setting for p in parts))
    models = list(dict.fromkeys(p.model for p in parts))
    rows = [summarize(p) for p in parts]
    comparisons = []
    for s in settings:
        here = [p for p in parts if p.setting == s]
        for i in range(len(here)):
            for j in range(i + 1, len(here)):
                comparisons.append(paired(here[i], here[j], n_boot, seed))
    storage.makedirs(out)
    grid = [[(f"{MODEL_TITLES.get(m, m)}: {SETTING_TITLES.get(s, s)}", p.y, p.probs)
             if (p := next((q for q in parts if q.model == m and q.setting == s), None)) is not None else None
             for s in settings] for m in models]
    roc_grid_png(grid, storage.join(out, "roc_compare.png"))
    result = {"rows": rows, "paired": comparisons, "settings": settings, "models": models,
              "published_source": "Du et al., Breast Cancer Research 2025, Table 2 (AUC only)",
              "n_boot": n_boot, "seed": seed}
    storage.write_text_atomic(storage.join(out, "compare.json"), json.dumps(result, indent=2) + "\n")
    storage.write_text_atomic(storage.join(out, "table2.md"), render_markdown(result))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    lines = ["# Table 2: KAT vs SlideGraph+ (mean ± std over folds)", "",
             "| Model | Setting | ACC | AUC | F1 | Paper AUC |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pub = r["published_auc"]
        lines.append(f"| {MODEL_TITLES.get(r['model'], r['model'])} | {SETTING_TITLES.get(r['setting'], r['setting'])}"
                     f" | {fmt_mean_std(r['accuracy'])} | {fmt_mean_std(r['auc_macro_ovr'])} | "
                     f"{fmt_mean_std(r['f1_macro'])} | {fmt_mean_std(pub) if pub else 'n/a'} |")
    lines += ["", f"Paper numbers: {result['published_source']}; the paper's ACC/F1 are not reproduced here.",
              "AUC = macro one-vs-rest over the HER2 scores present; F1 = macro F1.", "",
              "## Paired comparison (same folds, same slides)", "",
              "| Setting | A − B | Δ macro AUC (pooled) | 95% CI (paired bootstrap) | p | Δ AUC per fold | folds A better |",
              "|---|---|---|---|---|---|---|"]
    for c in result["paired"]:
        b = c.get("bootstrap") or {}
        fd = c.get("fold_auc_diff")
        lines.append(f"| {c['setting']} | {MODEL_TITLES.get(c['a'], c['a'])} − {MODEL_TITLES.get(c['b'], c['b'])} | "
                     f"{fmt(b.get('diff'))} | [{fmt(b.get('lo'))}, {fmt(b.get('hi'))}] | {fmt(b.get('p_value'))} | "
                     f"{fmt_mean_std(fd) if fd else 'folds differ'} | "
                     f"{'n/a' if not fd else str(fd['a_better']) + '/' + str(len(fd['per_fold']))} |")
    notes = [c["note"] for c in result["paired"] if c.get("note")]
    lines += [""] + [f"Note: {n}" for n in notes] + ["", "![ROC per class, per model and setting](roc_compare.png)", ""]
    return "\n".join(lines)
