"""``her2ray cohort``: merge per-center manifests, summarise a cohort, check for site bias.

    her2ray cohort merge --config merge.yaml --out unified.csv [--summary-dir DIR]
    her2ray cohort summary --manifest unified.csv --out-dir DIR [--features STORE] [--no-slide-metadata]
    her2ray cohort site-bias --features STORE --manifest unified.csv [--out report.json] [--strict]
    her2ray cohort tcga --clinical nationwidechildrens.org_clinical_patient_brca.txt --slides DIR|s3://... \
        --out tcga_manifest.csv [--slide-types DX] [--sample-types 01]
"""

from __future__ import annotations

import argparse
import json
import logging

from .. import storage
from ..config import load_yaml
from ..errors import ConfigError
from ..provenance import run_record, write_run_record

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("cohort", help="multi-center cohorts: merge manifests, summary, site bias",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cohort_command", metavar="SUBCOMMAND", required=True)

    m = sub.add_parser("merge", help="combine per-center manifests into one unified manifest")
    m.add_argument("--config", required=True, help="merge YAML (centers: [...]; see her2ray.cohorts.config)")
    m.add_argument("--section", default=None, help="read the merge config from this top-level YAML key")
    m.add_argument("--out", required=True, help="unified manifest, .csv or .parquet (local or s3://)")
    m.add_argument("--summary-dir", default=None, help="also write the per-center summary and reports here")
    m.set_defaults(func=run_merge)

    s = sub.add_parser("summary", help="per-center summary table (CSV + Markdown) and plot (PNG)")
    s.add_argument("--manifest", required=True, help="(unified) manifest with a 'center' column")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--features", default=None, help="feature store: tiles per slide from slides.parquet")
    s.add_argument("--no-slide-metadata", action="store_true",
                   help="do not open slides for MPP/scanner (opening remote slides downloads them)")
    s.set_defaults(func=run_summary)

    b = sub.add_parser("site-bias", help="can the center be predicted from slide features? (AUC)")
    b.add_argument("--features", required=True, help="feature store (<store>/features/<slide_id>.parquet)")
    b.add_argument("--manifest", required=True, help="manifest with slide_id and center")
    b.add_argument("--out", default=None, help="write the JSON report here")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--folds", type=int, default=5)
    b.add_argument("--threshold", type=float, default=0.75, help="AUC above which a warning is raised")
    b.add_argument("--strict", action="store_true", help="exit status 1 when the AUC is above the threshold")
    b.set_defaults(func=run_site_bias)

    t = sub.add_parser("tcga", help="TCGA-BRCA manifest from the GDC clinical file + diagnostic slide listing",
                       description="Join nationwidechildrens.org_clinical_patient_brca.txt (HER2 IHC level, status, "
                                   "FISH) with a folder or s3:// listing of TCGA .svs slides by barcode; keep FFPE "
                                   "diagnostic (DX) slides; write a labelled manifest and a report of what was left "
                                   "out (README: 'TCGA-BRCA').")
    t.add_argument("--clinical", required=True, help="GDC Biotab clinical patient file (tab-separated)")
    t.add_argument("--slides", required=True, help="folder or s3:// prefix holding the .svs files (recursive)")
    t.add_argument("--out", required=True, help="manifest CSV; <out>.tcga.json and <out>.tcga.md beside it")
    t.add_argument("--slide-types", default="DX", help="slide types kept, comma-separated (default DX = FFPE)")
    t.add_argument("--sample-types", default="01", help="TCGA sample types kept (default 01 = primary tumour)")
    t.set_defaults(func=run_tcga)


def run(args: argparse.Namespace) -> int:  # pragma: no cover - argparse dispatches to the subcommands
    return args.func(args)


def _sibling(url: str, suffix: str) -> str:
    """``unified.csv`` -> ``unified<suffix>`` in the same folder."""
    base, _, _ = str(url).rpartition(".")
    return f"{base or url}{suffix}"


def run_merge(args: argparse.Namespace) -> int:
    from ..cohorts import MergeConfig, merge_cohorts, write_summary, write_table
    from ..cohorts.merge import rows_table

    data = load_yaml(args.config)
    if args.section is not None:
        if args.section not in data:
            raise ConfigError(f"{args.config}: no section {args.section!r}")
        data = data[args.section]
    cfg = MergeConfig.from_mapping(data, source=str(args.config))
    result = merge_cohorts(cfg)
    write_table(result.to_table(), args.out)
    report = result.report()
    outputs = {"manifest": args.out}
    if args.summary_dir:
        outputs.update(write_summary(result.rows, args.summary_dir, features=cfg.features,
                                     slide_metadata=cfg.slide_metadata, max_workers=cfg.max_workers))
        for name, table in (("duplicates", result.duplicates), ("patient_overlap", result.patient_overlap)):
            if table:
                url = storage.join(args.summary_dir, f"{name}.csv")
                write_table(rows_table(table), url)
                outputs[name] = url
    record = run_record("cohort-merge", cfg.to_dict(), outputs=outputs, report=report)
    write_run_record(_sibling(args.out, ".merge.json"), record)
    print(f"merged {report['n_slides']} slides from {len(report['slides_per_center'])} centers -> {args.out}")
    for w in result.warnings:
        print(f"warning: {w}")
    if result.patient_overlap:
        print("patients under more than one center:")
        for r in result.patient_overlap[:20]:
            print(f"  {r['patient_id']}: {r['centers']} ({r['slides']})")
    return 0


def run_summary(args: argparse.Namespace) -> int:
    from ..cohorts import write_summary
    from ..manifest import load_manifest

    rows = load_manifest(args.manifest, required=("slide_id", "path"))
    paths = write_summary(rows, args.out_dir, features=args.features, slide_metadata=not args.no_slide_metadata)
    print(storage.read_text(paths["markdown"]))
    return 0


def run_site_bias(args: argparse.Namespace) -> int:
    from ..cohorts import site_bias_auc

    report = site_bias_auc(args.features, args.manifest, seed=args.seed, folds=args.folds,
                           threshold=args.threshold)
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out:
        storage.write_text_atomic(args.out, text + "\n")
    print(text)
    print(("WARNING: " if report["warning"] else "") + report["message"])
    return 1 if (args.strict and report["warning"]) else 0



def run_tcga(args: argparse.Namespace) -> int:
    from ..cohorts.tcga import build_tcga_cohort, write_manifest

    split = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
    cohort = build_tcga_cohort(args.clinical, args.slides, slide_types=split(args.slide_types),
                               sample_types=split(args.sample_types))
    write_manifest(cohort.rows, args.out)
    report = cohort.report()
    storage.write_text_atomic(_sibling(args.out, ".tcga.json"), json.dumps(report, indent=2) + "\n")
    lines = [f"# TCGA cohort: {report['n_slides']} slides, {report['n_patients']} patients",
             "", f"HER2 IHC level per slide: {report['slides_per_score']}",
             f"Kept slide types {report['settings']['slide_types_kept']}, sample types "
             f"{report['settings']['sample_types_kept']}; frozen sections dropped: "
             f"{report['settings']['frozen_dropped']}", ""]
    for title, key in (("Dropped slides", "dropped_slides"), ("Slides without a label", "unlabelled_slides"),
                       ("Patients without a slide", "patients_without_slide"), ("Equivocal cases", "equivocal"),
                       ("IHC level vs status-by-IHC conflicts", "ihc_score_status_conflicts")):
        items = report[key]
        lines.append(f"## {title}: {len(items)}")
        lines += [f"- {json.dumps(i) if isinstance(i, dict) else i}" for i in items[:200]]
        lines.append("")
    storage.write_text_atomic(_sibling(args.out, ".tcga.md"), "\n".join(lines))
    print(f"wrote {args.out}: {report['n_slides']} slides of {report['n_patients']} patients "
          f"{report['slides_per_score']}")
    print(f"left out: {len(report['dropped_slides'])} dropped slide(s) (frozen/other), "
          f"{len(report['unlabelled_slides'])} slide(s) without a label, {len(report['patients_without_slide'])} "
          f"patient(s) without a slide; {len(report['equivocal'])} equivocal case(s); "
          f"details in {_sibling(args.out, '.tcga.md')}")
    return 0
