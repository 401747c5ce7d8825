"""``her2ray synth``: write synthetic H&E-like slides (a labelled cohort with manifest.csv, or one slide),
for tests, benchmarks and the end-to-end demo without real data."""

from __future__ import annotations

import argparse
from collections import Counter

from ..errors import ConfigError
from ..labels import HER2_SCORES, parse_her2_score


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="write synthetic slides (+ manifest.csv)",
        description="Write pyramidal JPEG TIFF slides that OpenSlide opens, with tissue-like blobs and a "
                    "planted HER2-class signal. Cohort mode: --out DIR --n-slides N. "
                    "Single-slide mode: --single --out SLIDE.tiff [--label 2+].")
    p.add_argument("--out", required=True, help="cohort folder, or the slide file with --single")
    p.add_argument("--n-slides", type=int, default=None, help="number of slides in the cohort")
    p.add_argument("--single", action="store_true", help="write one slide to --out")
    p.add_argument("--label", default=None, help="--single only: HER2 class (0, 1+, 2+, 3+) of the planted signal")
    p.add_argument("--width-px", type=int, default=2816, help="level-0 width (default 2816)")
    p.add_argument("--height-px", type=int, default=None, help="level-0 height (default: = width)")
    p.add_argument("--mpp", type=float, default=0.5, help="level-0 microns per pixel (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-centers", type=int, default=2, help="cohort centres (mild colour shift each)")
    p.add_argument("--center-shift", type=float, default=0.08, help="strength of the per-centre colour shift")
    p.add_argument("--signal-strength", type=float, default=1.0, help="opacity of the planted pattern, 0..1")
    p.add_argument("--workers", type=int, default=1, help="processes writing slides in parallel")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..synth import synth_cohort, write_synthetic_slide

    height = args.height_px or args.width_px
    if args.single == (args.n_slides is not None):
        raise ConfigError("give either --n-slides N (cohort) or --single (one slide)")
    if args.single:
        label = None
        if args.label is not None:
            try:
                label = parse_her2_score(args.label)
            except ValueError as exc:
                raise ConfigError(f"--label: {exc}") from None
        write_synthetic_slide(args.out, args.width_px, height, mpp=args.mpp, label=label, seed=args.seed,
                              signal_strength=args.signal_strength)
        print(f"wrote {args.out} ({args.width_px}x{height} px at {args.mpp:g} um/px, "
              f"label {'none' if label is None else HER2_SCORES[label]})")
        return 0
    if args.label is not None:
        raise ConfigError("--label applies to --single only (cohort labels are balanced)")
    if args.n_slides <= 0:
        raise ConfigError(f"--n-slides must be positive, got {args.n_slides}")
    rows = synth_cohort(args.out, args.n_slides, n_centers=args.n_centers, seed=args.seed,
                        width_px=args.width_px, height_px=height, mpp=args.mpp,
                        signal_strength=args.signal_strength, center_shift=args.center_shift,
                        workers=args.workers)
    classes = Counter(r["her2_score"] for r in rows)
    centers = Counter(r["center"] for r in rows)
    print(f"wrote {len(rows)} slides ({args.width_px}x{height} px at {args.mpp:g} um/px) to {args.out}; "
          f"classes {dict(sorted(classes.items()))}, centres {dict(sorted(centers.items()))}")
    print(f"manifest: {args.out.rstrip('/')}/manifest.csv")
    return 0
