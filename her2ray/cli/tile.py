"""``her2ray tile``: plan the tissue tile grid of one slide and write it as Parquet (a QC / debugging aid
and the same code path the embedding stage uses)."""

from __future__ import annotations

import argparse
import json

from .. import __version__, storage
from ..tiling import TilingConfig, plan_tiles


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tile", help="tissue mask + tile grid of one slide -> grid.parquet",
        description="Segment tissue on a thumbnail and write the grid of tiles kept at the target "
                    "resolution: x, y (level-0 px of the top-left corner), tissue_fraction, level, mpp.")
    p.add_argument("slide", help="slide path or URL (s3://..., file://...)")
    p.add_argument("--out", required=True, help="output grid Parquet (path or URL)")
    p.add_argument("--mpp", type=float, default=None, help="target microns per pixel of the tiles (default 0.5)")
    p.add_argument("--tile-px", type=int, default=None, help="tile edge in pixels at --mpp (default 256)")
    p.add_argument("--min-tissue", type=float, default=None,
                   help="drop tiles whose tissue fraction is below this (default 0.25)")
    p.add_argument("--snap-read-px", action="store_true", default=None,
                   help="read exactly 2x/4x/8x --tile-px when within 2%% of --mpp (see her2ray embed --help)")
    p.add_argument("--mpp-override", type=float, default=None,
                   help="the slide's level-0 microns per pixel, when the file lacks or misstates it")
    p.add_argument("--mpp-from-magnification", action="store_true",
                   help="opt-in: a slide with no MPP but an objective power gets 10 um / power (40x -> 0.25)")
    p.add_argument("--mask-png", default=None,
                   help="also write a QC picture: thumbnail + tissue outline (green) + kept tile grid (yellow)")
    p.add_argument("--config", default=None, help="YAML file with a 'tiling' section (flags win)")
    p.add_argument("--backend", default="openslide", help="slide reader backend (default openslide)")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> TilingConfig:
    base = TilingConfig.from_yaml(args.config, section="tiling").to_dict() if args.config else {}
    flags = {"target_mpp": args.mpp, "tile_px": args.tile_px, "min_tissue": args.min_tissue,
             "snap_read_px": args.snap_read_px}
    base.update({k: v for k, v in flags.items() if v is not None})
    return TilingConfig.from_mapping(base, source="her2ray tile flags")


def _slide_name(slide: str) -> str:
    import posixpath

    return posixpath.basename(str(slide).rstrip("/"))


def run(args: argparse.Namespace) -> int:
    from ..slides import open_slide

    cfg = _config(args)
    if storage.is_local(args.slide):   # a FIFO or folder must fail here, not hang or crash in the reader
        from ..errors import SlideNotFoundError, SlideReadError
        from ..preflight import check_local

        reason = check_local(storage.local_path(args.slide))
        if reason is not None:
            raise (SlideNotFoundError if "not found" in reason else SlideReadError)(args.slide, reason)
    with open_slide(args.slide, mpp_override=args.mpp_override, backend=args.backend,
                    mpp_from_magnification=args.mpp_from_magnification) as reader:
        grid = plan_tiles(reader, cfg)
        mpp_source = reader.mpp_source
        if reader.mpp_warning:
            print(f"warning: {args.slide}: {reader.mpp_warning}")
        if args.mask_png:
            from ..tiling.qc import slide_qc_png

            storage.write_bytes_atomic(args.mask_png, slide_qc_png(reader, grid, _slide_name(args.slide)))
    table = grid.to_table()
    meta = dict(table.schema.metadata or {})
    meta[b"her2ray"] = json.dumps({"slide": str(args.slide), "her2ray_version": __version__,
                                   "tiling": cfg.to_dict(), "mpp_source": mpp_source}).encode()
    storage.write_parquet_atomic(table.replace_schema_metadata(meta), args.out)
    w, h = grid.slide_dimensions
    print(f"{args.slide}: {len(grid)} of {grid.n_grid_cells} tiles kept "
          f"({grid.tile_px} px at {grid.target_mpp:g} um/px, tissue >= {cfg.min_tissue:g}); "
          f"slide {w}x{h} px at {grid.slide_mpp:g} um/px ({mpp_source}); read level {grid.level} "
          f"(downsample {grid.level_downsample:g}, {grid.read_px} px per tile); "
          f"tissue mask {float(grid.mask.mean()):.1%} of the slide")
    print(f"wrote {args.out}" + (f" and {args.mask_png}" if args.mask_png else ""))
    return 0
