"""``her2ray heatmap``: attention heatmap PNGs + QuPath GeoJSON for scored slides (Ray tasks, one per slide)."""

from __future__ import annotations

import argparse

from .. import console
from ..errors import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "heatmap", help="attention heatmaps (PNG + QuPath GeoJSON) for scored slides",
        description="Per slide: OUT/<slide_id>.png (labelled H&E | attention panels, scale bar, colour bar, predicted "
                    "score and the true score when --slides is a manifest with her2_score; random-weight runs "
                    "are stamped RANDOM WEIGHTS) "
                    "and OUT/<slide_id>.geojson (one QuPath detection per tile, level-0 px, measurement "
                    "'attention'). OUT/heatmaps.csv lists every slide with its status and reason.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", help="output folder of `her2ray score --attention` (uses its attention/ "
                                      "and predictions.parquet)")
    src.add_argument("--attention", help="folder of attention files (<slide_id>.parquet)")
    p.add_argument("--slides", required=True, nargs="+",
                   help="a manifest (CSV/Parquet with slide_id, path) or slide files (id = file name stem)")
    p.add_argument("--predictions",
                   help="predictions.parquet/.csv for the titles (default: SCORES/predictions.parquet)")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--slide-id", nargs="+", action="extend", dest="slide_ids",
                   help="only these slides (default: every slide with an attention file and a path)")
    p.add_argument("--features", help="feature store, for the tile size when attention files lack it")
    p.add_argument("--tile-size", type=float, help="tile edge in level-0 px (overrides file metadata)")
    p.add_argument("--max-px", type=int, default=1024, help="thumbnail longer side in px (default 1024)")
    p.add_argument("--cmap", default="viridis",
                   help="perceptual colormap: viridis (default; contrasts with H&E pink), magma, inferno, plasma, cividis")
    p.add_argument("--alpha", type=float, default=0.6, help="overlay opacity (default 0.6)")
    p.add_argument("--normalize", default="minmax", choices=("minmax", "rank", "none"),
                   help="per-slide score scaling for colours (default minmax)")
    p.add_argument("--scale", default="slide", choices=("slide", "cohort"),
                   help="colour scale: per slide (--normalize) or one scale for the cohort (attention relative to "
                        "the slide's mean tile, 0 .. 99th percentile of all slides) so slides can be compared")
    p.add_argument("--no-png", action="store_true", help="GeoJSON only")
    p.add_argument("--no-geojson", action="store_true", help="PNG only")
    p.add_argument("--address", help="Ray address; default: local Ray (started if needed)")
    p.add_argument("--slide-timeout", type=float, default=None,
                   help="seconds without progress on one slide before it is failed and its worker recycled "
                        "(default 600, plus 300 per GiB of slide file; Ray mode only)")
    p.add_argument("--local", action="store_true", help="render in this process, without Ray")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from .. import storage
    from ..heatmaps.pipeline import HeatmapConfig, plan_jobs, preflight_jobs, render_cohort, write_status

    if args.scores:
        attention_dir = storage.join(args.scores, "attention")
        predictions = args.predictions
        if predictions is None and storage.exists(storage.join(args.scores, "predictions.parquet")):
            predictions = storage.join(args.scores, "predictions.parquet")
    else:
        attention_dir, predictions = args.attention, args.predictions
    if not storage.exists(attention_dir):
        raise ConfigError(f"{attention_dir}: no attention folder (run `her2ray score --attention`)")
    cfg = HeatmapConfig.from_mapping({
        "out": args.out, "max_px": args.max_px, "cmap": args.cmap, "alpha": args.alpha,
        "normalize": args.normalize, "scale": args.scale, "png": not args.no_png, "geojson": not args.no_geojson,
        "address": args.address,
        **({"slide_timeout": args.slide_timeout} if args.slide_timeout is not None else {})},
        source="her2ray heatmap flags")
    jobs, failed = plan_jobs(attention_dir, args.slides, predictions=predictions, slide_ids=args.slide_ids,
                             features=args.features, tile_size=args.tile_size)
    if not jobs and not failed:
        raise ConfigError(f"nothing to render: no attention files in {attention_dir} match --slides")
    if cfg.png:   # slides are opened only for the PNG: check them before Ray starts
        jobs, unreadable = preflight_jobs(jobs)
        failed += unreadable
    rows = failed + render_cohort(jobs, cfg, local=args.local, progress=not args.no_progress)
    status_url = write_status(cfg.out, rows)
    n_ok = sum(r["status"] == "ok" for r in rows)
    print(f"heatmaps: {n_ok}/{len(rows)} slides rendered into {cfg.out} ({len(rows) - n_ok} failed, "
          f"see {status_url})", file=console.stderr())
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['slide_id']}: {r['reason']}", file=console.stderr())
    return 0 if n_ok == len(rows) else 1
