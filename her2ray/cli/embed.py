"""``her2ray embed``: tissue tiles of every manifest slide -> encoder features -> Parquet feature store (Ray Data).

Flags win over the ``embed`` section of ``--config`` (YAML). The manifest is validated before any work.
Exit status: 0 when every slide is ok or skipped, 1 when any slide failed (the count and reasons are printed;
the rest of the cohort is still embedded), 2 for bad input (manifest, config, encoder weights).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import console
from ..config import yaml_section
from ..errors import ConfigError

#: YAML keys of the ``embed`` section that place work on the cluster (everything else is an EmbedConfig key)
RAY_KEYS = ("address", "num_actors", "num_gpus_per_actor", "num_cpus_per_actor", "overwrite", "progress",
            "slide_timeout", "max_worker_crashes", "engine", "tile_transport", "num_readers", "max_inflight_mb")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed", help="embed tissue tiles with PLIP (or another encoder) into a Parquet feature store",
        description="Writes OUT/features/<slide_id>.parquet (x, y, tissue_fraction, feature), OUT/slides.parquet "
                    "(status per slide: ok | failed | skipped) and OUT/run.json. Reruns skip slides already "
                    "embedded with the same encoder and tiling settings (use --overwrite to recompute).")
    p.add_argument("--manifest", required=True, help="CSV/Parquet with slide_id, path [, mpp, ...] (local or s3://)")
    p.add_argument("--out", required=True, help="feature store: local folder or s3:// prefix")
    p.add_argument("--encoder", default=None, help="plip (default) | open_clip:<arch> | open_clip")
    p.add_argument("--weights", default=None,
                   help="hub id (vinid/plip), local folder (transformers or open_clip format) or file; "
                        "default: RANDOM weights (a warning is logged and recorded)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16", "bf16-pure", "fp16-pure"],
                   help="default: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when the actor has a GPU)")
    p.add_argument("--mpp", type=float, default=None, help="target microns per pixel of the tiles (default 0.5)")
    p.add_argument("--tile-px", type=int, default=None, help="tile edge in pixels at --mpp (default 256)")
    p.add_argument("--min-tissue", type=float, default=None, help="minimum tissue fraction of a tile (default 0.25)")
    p.add_argument("--snap-read-px", action="store_true", default=None,
                   help="read exactly 2x/4x/8x --tile-px when within 2%% of --mpp (a 0.252 um/px 40x scan: 512 px "
                        "reads, 0.504 um/px tiles), so the pipelined engine decodes 40x scans at 1/2 in the DCT "
                        "domain (the fast path); part of the tiling settings and the resume key")
    p.add_argument("--stain-normalization", default=None, choices=["none", "macenko", "reinhard"],
                   help="normalise tile stains before encoding (default none); recorded in every feature file")
    p.add_argument("--mpp-from-magnification", action="store_true", default=None,
                   help="opt-in: slides with no MPP but an objective power get 10 um / power (40x -> 0.25 um/px); "
                        "recorded as mpp_source in each feature file (default: such slides fail)")
    p.add_argument("--slide-backend", default=None, help="slide reader: openslide (default) | tiffslide")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per encoder batch (default 1024 GPU / 64 CPU)")
    p.add_argument("--read-workers", type=int, default=None, help="tile-reading threads per actor")
    p.add_argument("--address", default=None, help="Ray address (auto, host:6379, ray://host:10001); "
                                                    "default: $RAY_ADDRESS inside a job, else a local Ray")
    p.add_argument("--num-actors", type=int, default=None, help="encoder actors (default: one per GPU, "
                                                                 "or cluster CPUs / --num-cpus-per-actor)")
    p.add_argument("--num-gpus-per-actor", type=float, default=None,
                   help="GPUs per actor; fractions share a GPU (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--num-cpus-per-actor", type=float, default=None, help="CPUs per CPU-only actor (default 4)")
    p.add_argument("--engine", default=None, choices=["auto", "pipelined", "slide"],
                   help="pipelined: CPU reader tasks several slides ahead feed encoder actors that take tiles of any "
                        "slide; slide: the reference engine, one slide per actor call; auto (default): pipelined "
                        "when the encoder actors get GPUs, slide on CPU-only clusters")
    p.add_argument("--tile-transport", default=None, choices=["auto", "jpeg", "rgb", "scaled"],
                   help="pipelined engine: how tiles travel to the encoder. scaled: readers decode 40x-style "
                        "tiles (read level exactly 2x/4x/8x finer than the target) at 1/2 (1/4, 1/8) in the DCT "
                        "domain, so they arrive at tile size with no resize; jpeg: compressed JPEG file tiles "
                        "when the slide's tiles line up with the grid (decoded, assembled and downscaled on the "
                        "encoder's device: nvJPEG on a GPU); rgb: decoded pixels at the read level, downscaled on "
                        "the encoder's device. Slides a route cannot serve fall back to rgb. auto (default): "
                        "scaled, then jpeg on GPU actors, then rgb")
    p.add_argument("--num-readers", type=int, default=None,
                   help="pipelined engine: concurrent reader tasks (default: cluster CPUs not used by encoders)")
    p.add_argument("--max-inflight-mb", type=float, default=None,
                   help="pipelined engine: cap on the object store memory tiles in flight may use "
                        "(default: Ray Data's own backpressure budget)")
    p.add_argument("--slide-timeout", type=float, default=None,
                   help="seconds without progress before a slide is failed and its worker recycled "
                        "(default 600, plus 300 per GiB of slide file)")
    p.add_argument("--max-worker-crashes", type=int, default=None,
                   help="worker crashes on one slide after which it is failed (default 2; Ray retries it until then)")
    p.add_argument("--overwrite", action="store_true", help="recompute slides that already have feature files")
    p.add_argument("--config", default=None, help="YAML file; its `embed` section gives defaults, flags win")
    p.add_argument("--qc-dir", default=None,
                   help="write a tissue-detection QC picture per embedded slide (thumbnail + tissue outline + kept "
                        "tiles) and contact sheets of 30 slides per PNG into this folder (local or s3://)")
    p.add_argument("--no-progress", action="store_true", help="no per-slide progress lines")
    p.set_defaults(func=run)
    return p


def _absolute(url: str | None) -> str | None:
    """Local folders are made absolute: Ray workers may run in another working directory."""
    from .. import storage

    return os.path.abspath(url) if url and storage.is_local(url) else url


def build_config(args) -> tuple[Any, dict[str, Any]]:
    """(EmbedConfig, Ray options) from ``--config`` + flags."""
    from ..features.embed import EmbedConfig

    source = args.config or "her2ray embed flags"
    data: dict[str, Any] = {}
    if args.config:
        data = yaml_section(args.config, "embed")
    ray_opts = {k: data.pop(k) for k in RAY_KEYS if k in data}
    tiling = dict(data.pop("tiling", None) or {})
    for flag, key in (("mpp", "target_mpp"), ("tile_px", "tile_px"), ("min_tissue", "min_tissue"),
                      ("snap_read_px", "snap_read_px")):
        if getattr(args, flag) is not None:
            tiling[key] = getattr(args, flag)
    flags = {"encoder": args.encoder, "weights": args.weights, "precision": args.precision,
             "device": args.device, "batch_size": args.batch_size, "read_workers": args.read_workers,
             "stain_normalization": args.stain_normalization, "qc_dir": _absolute(args.qc_dir),
             "mpp_from_magnification": args.mpp_from_magnification, "slide_backend": args.slide_backend}
    data.update({k: v for k, v in flags.items() if v is not None})
    data["tiling"] = tiling
    cfg = EmbedConfig.from_mapping(data, source=source)
    for key in ("address", "num_actors", "num_gpus_per_actor", "num_cpus_per_actor", "slide_timeout",
                "max_worker_crashes", "engine", "tile_transport", "num_readers", "max_inflight_mb"):
        if getattr(args, key) is not None:
            ray_opts[key] = getattr(args, key)
    if args.overwrite:
        ray_opts["overwrite"] = True
    if args.no_progress:
        ray_opts["progress"] = False
    for key in ("num_actors", "num_readers"):
        if ray_opts.get(key) is not None and int(ray_opts[key]) < 1:
            raise ConfigError(f"{source}: {key} must be >= 1, got {ray_opts[key]}")
    if ray_opts.get("slide_timeout") is not None and float(ray_opts["slide_timeout"]) <= 0:
        raise ConfigError(f"{source}: slide_timeout must be > 0 seconds, got {ray_opts['slide_timeout']}")
    if ray_opts.get("max_worker_crashes") is not None and int(ray_opts["max_worker_crashes"]) < 1:
        raise ConfigError(f"{source}: max_worker_crashes must be >= 1, got {ray_opts['max_worker_crashes']}")
    return cfg, ray_opts


def run(args) -> int:
    from ..features.pipeline import embed_slides
    from ..manifest import load_manifest

    rows = load_manifest(args.manifest)          # validated before any work (ManifestError -> exit 2)
    cfg, ray_opts = build_config(args)
    summary = embed_slides(rows, args.out, cfg, manifest=args.manifest, **ray_opts)
    print(summary.table())
    if summary.n_failed:
        print(f"her2ray embed: {summary.n_failed} of {summary.n_slides} slide(s) failed "
              f"(reasons in {summary.catalog_url})", file=console.stderr())
        return 1
    return 0
