"""Cohort embedding throughput: the pipelined engine vs the reference (slide-serial) engine, same run, on Ray.

A synthetic cohort of ``--n-slides`` manifest rows, half "40x" (0.25 um/px with a 1/4/16 pyramid: 0.5 um/px
tiles are read at level 0 and downscaled 2x) and half "20x" (0.5 um/px level 0). To keep generation short the
rows reuse a few generated files (``--files-per-kind``; distinct slide ids, so every row is embedded), and
``--big`` rows of each kind point at one larger file (> 20k tissue tiles at the GPU defaults).

For each engine (``her2ray.features.pipeline.embed_slides``, engine="pipelined" and engine="slide") it reports:
tiles, wall seconds, start-up (to the first finished slide; Ray start-up is timed apart, once), steady-state
tiles/s after it, the share of time the encoder waited for input, and seconds per stage; then the ratio
pipelined / reference and a 1,000-slide projection. ``--stand-in`` uses a tiny open_clip tower (reading, not
the ViT, is what gets measured on a CPU). ``--check`` first compares, on this machine's device, the pipelined
path with the reference (OpenSlide + CPU) on one 40x slide and the real SVS: coordinates and cosine per tile,
and the device decoder's self-test (nvJPEG on a GPU).

    python3 benchmarks/embed_cohort.py --stand-in --n-slides 8 --px-40x 6144 --px-20x 4096 --big 0   # CPU
    bash benchmarks/embed_cohort_gpu.sh                                                            # H200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
for _k, _v in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_AUTH_MODE", "disabled"), ("RAY_DATA_DISABLE_PROGRESS_BARS", "1")):
    os.environ.setdefault(_k, _v)

#: stand-in encoder: input = the 256 px tile itself (no resize), 16 patches of 64 px, one narrow layer: a few
#: MFLOP per tile, so on a CPU the benchmark measures reading, decoding, downscaling and bookkeeping
STAND_IN_CFG = {"embed_dim": 32, "quick_gelu": True,
                "vision_cfg": {"image_size": 256, "layers": 1, "width": 32, "patch_size": 64, "head_width": 16}}


def stand_in_encoder(folder: str) -> str:
    import torch
    from open_clip.model import _build_vision_tower

    from her2ray.encoders import write_open_clip_dir

    torch.manual_seed(0)
    tower = _build_vision_tower(STAND_IN_CFG["embed_dim"], STAND_IN_CFG["vision_cfg"], quick_gelu=True)
    return write_open_clip_dir(tower.state_dict(), STAND_IN_CFG, folder)


def make_cohort(folder: str, n_slides: int, files_per_kind: int, px_40x: int, px_20x: int, big: int,
                big_40x: int, big_20x: int) -> list[dict]:
    """Manifest rows (half 40x, half 20x) over a few generated files."""
    files: dict[str, list[str]] = {"40x": [], "20x": []}
    t0 = time.perf_counter()
    for kind, px, mpp, step in (("40x", px_40x, 0.25, 4), ("20x", px_20x, 0.5, 2)):
        for i in range(files_per_kind):
            files[kind].append(_slide(folder, f"{kind}_{i}", px, mpp, step, seed=i))
    bigs = {"40x": _slide(folder, "40x_big", big_40x, 0.25, 4, 99) if big else None,
            "20x": _slide(folder, "20x_big", big_20x, 0.5, 2, 98) if big else None}
    print(f"generated {2 * files_per_kind + 2 * bool(big)} slide files in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for k in range(n_slides):
        kind = "40x" if k % 2 == 0 else "20x"
        j = k // 2
        path = bigs[kind] if j < big else files[kind][j % files_per_kind]
        rows.append({"slide_id": f"{kind}_{k:04d}", "path": path, "kind": kind})
    return rows


def _slide(folder: str, name: str, px: int, mpp: float, step: int, seed: int) -> str:
    """A big pyramidal JPEG TIFF, tiles copied from a small rendered one (embed_throughput.make_big_slide)."""
    from embed_throughput import make_big_slide

    return make_big_slide(os.path.join(folder, f"{name}.tiff"), px, px, seed=seed, mpp=mpp, level_step=step)


def run_engine(name: str, rows: list[dict], store: str, cfg, opts: dict) -> dict:
    """One engine run; ``name`` is ``slide``, ``pipelined`` or ``pipelined:<tile transport>``."""
    from her2ray.features.pipeline import embed_slides

    engine, _, transport = name.partition(":")
    if transport:
        opts = {**opts, "tile_transport": transport}
    t0 = time.perf_counter()
    summary = embed_slides(rows, store, cfg, engine=engine, progress=False, **opts)
    wall = time.perf_counter() - t0
    if summary.n_failed:
        raise RuntimeError(f"{engine}: {summary.n_failed} slides failed: {summary.failed[:3]}")
    st = dict(summary.stages)
    out = {**st, "engine": name, "tiles": summary.n_tiles_embedded, "seconds": round(wall, 3),
           "tiles_per_s": round(summary.n_tiles_embedded / wall, 1)}
    loops = st.get("encoder_loops") or {}
    if loops:   # encoder clock: from each loop's first forward to its last, actor start-up excluded
        span = max(s["busy_s"] + s["idle_s"] for s in loops.values())
        out["encoder_clock_tiles_per_s"] = round(sum(s["rows"] for s in loops.values()) / span, 1) if span else None
    if engine == "slide":
        import pyarrow.parquet as pq

        cat = pq.read_table(os.path.join(store, "slides.parquet")).to_pandas()
        wait, enc = float(cat.read_wait_s.sum()), float(cat.encode_s.sum())
        busy = float(cat.seconds.sum()) / max(1, int(summary.actors.get("num_actors", 1)))
        out.update(read_wait_s=round(wait, 3), encode_s=round(enc, 3), slide_s=round(float(cat.seconds.sum()), 3),
                   device_idle_share=round(1 - enc / busy, 4) if busy else None,
                   encoder_clock_tiles_per_s=round(summary.n_tiles_embedded / busy, 1) if busy else None)
    return out


def reader_costs(path: str, n_tiles: int = 256) -> dict:
    """Single-thread CPU ms per tile (process CPU time, robust to a loaded box) of each read path on one slide:
    the reference reader (decode + CPU resize), the pipelined readers (pixels at the read level; 1/2-scale DCT
    decode straight to tile size, 40x only; compressed tiles: pread only) and the device-side work done here on
    the CPU (decode + assemble + box downscale)."""
    import torch

    from her2ray.encoders.device_tiles import box_downscale, decode_jpeg_payloads
    from her2ray.slides import open_slide
    from her2ray.tiling import TilingConfig, plan_tiles, read_tiles
    from her2ray.tiling.jpeg_payload import jpeg_layout, jpeg_payloads
    from her2ray.tiling.scaled_read import dct_scale, scaled_tiles

    torch.set_num_threads(1)
    with open_slide(path) as reader:
        grid = plan_tiles(reader, TilingConfig(), keep_mask=False)
        layout = jpeg_layout(reader, grid)
        scale = dct_scale(reader, grid)
        idx = np.arange(min(n_tiles, len(grid)))
        payloads = jpeg_payloads(reader, grid, layout, idx) if layout is not None else None
    out = {"tiles": len(idx), "read_px": int(grid.read_px), "level": int(grid.level)}

    def cpu_ms(fn):                 # a fresh slide handle per repeat: cold decoded-tile cache
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            with open_slide(path) as r:
                fn(r)
            best = min(best, (time.process_time() - t0) * 1e3 / len(idx))
        return round(best, 4)

    out["reference_read_resize_ms"] = cpu_ms(lambda r: read_tiles(r, grid, idx, num_workers=1))
    out["rgb_payload_ms"] = cpu_ms(lambda r: [t.tobytes() for t in read_tiles(r, grid, idx, num_workers=1,
                                                                               resize=False)])
    if scale:
        out["scaled_payload_ms"] = cpu_ms(lambda r: [t.tobytes() for t in scaled_tiles(r, grid, scale, idx)])
    if layout is not None:
        out["jpeg_payload_ms"] = cpu_ms(lambda r: jpeg_payloads(r, grid, layout, idx))
        cpu = torch.device("cpu")
        out["device_side_on_cpu_ms"] = cpu_ms(
            lambda r: box_downscale(decode_jpeg_payloads(payloads, layout.k, cpu).float(), grid.tile_px))
        out["jpeg_bytes_per_tile"] = int(np.mean([len(p) for p in payloads]))
    print(f"reader CPU ms/tile on {os.path.basename(path)}: {out}", flush=True)
    return out


def check_equivalence(cfg, folder: str, px: int) -> dict:
    """Pipelined path vs the reference (OpenSlide + CPU) on this device: a 40x slide and the real SVS."""
    from her2ray.encoders.device_loop import EncodeLoop
    from her2ray.encoders.device_tiles import jpeg_rgb_selftest
    from her2ray.features.embed import embed_slide, load_engine_encoder
    from her2ray.features.fast_engine import embed_rows_local
    from her2ray.features.schema import feature_url, read_slide_features
    from her2ray.synth import write_synthetic_slide
    from her2ray.tiling import TilingConfig

    enc = load_engine_encoder(cfg)
    s40 = write_synthetic_slide(os.path.join(folder, "check40.tiff"), px, px, mpp=0.25, seed=5, level_step=4)
    svs = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs")
    report = {"decoder_selftest": jpeg_rgb_selftest(enc.device), "device": str(enc.device)}
    loop = EncodeLoop(enc)
    cases = (("synthetic-40x", s40, None, cfg, "auto"), ("synthetic-40x-jpeg", s40, None, cfg, "jpeg"),
             ("svs", svs, None, cfg, "auto"),
             ("svs-2x", svs, 0.5, cfg.model_copy(update={"tiling": TilingConfig(target_mpp=1.0)}), "auto"))
    for name, path, mpp, ccfg, transport in cases:
        if not os.path.exists(path):
            report[name] = "missing"
            continue
        row = {"slide_id": name, "path": path, **({"mpp": mpp} if mpp else {})}
        os.environ["HER2RAY_FAST_TIFF"] = "0"
        embed_slide(row, enc, ccfg, os.path.join(folder, "ref"))
        os.environ.pop("HER2RAY_FAST_TIFF")
        embed_rows_local([row], loop, ccfg, os.path.join(folder, "new"), transport=transport)
        a = read_slide_features(feature_url(os.path.join(folder, "ref"), name))
        b = read_slide_features(feature_url(os.path.join(folder, "new"), name))
        cos = (a.features * b.features).sum(1) / np.linalg.norm(a.features, axis=1) / np.linalg.norm(b.features, axis=1)
        report[name] = {"tiles": len(a.x), "coords_equal": bool(np.array_equal(a.coords, b.coords)),
                        "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                        "transport": b.meta.extra["transport"]}
        print(f"check {name}: {report[name]}", flush=True)
    loop.close()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-slides", type=int, default=40)
    ap.add_argument("--files-per-kind", type=int, default=3)
    ap.add_argument("--px-40x", type=int, default=32768, help="level-0 edge of the 40x files")
    ap.add_argument("--px-20x", type=int, default=16384, help="level-0 edge of the 20x files")
    ap.add_argument("--big", type=int, default=2, help="rows of each kind that use the big file")
    ap.add_argument("--big-px-40x", type=int, default=131072, help="> 20k tissue tiles at 0.5 um/px (~23k)")
    ap.add_argument("--big-px-20x", type=int, default=57344, help="> 20k tissue tiles (~22k)")
    ap.add_argument("--stand-in", action="store_true", help="tiny open_clip tower instead of PLIP")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--engines", default="pipelined,slide",
                    help="comma list of slide | pipelined | pipelined:<tile transport> (auto, scaled, jpeg, rgb); "
                         "ratios are the first run over the 'slide' run")
    ap.add_argument("--num-readers", type=int, default=None)
    ap.add_argument("--check", action="store_true", help="equivalence check on this device first")
    ap.add_argument("--slides-dir", default=None, help="keep generated slides here (default: a temp folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import ray
    import torch

    from her2ray.features.embed import EmbedConfig
    from her2ray.ray_runtime import ensure_ray

    results: dict = {"torch": torch.__version__, "cpus": os.cpu_count(),
                     "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="her2ray-cohort-") as tmp:
        folder = args.slides_dir or tmp
        os.makedirs(folder, exist_ok=True)
        enc_kw = ({"encoder": "open_clip", "weights": stand_in_encoder(os.path.join(tmp, "standin"))}
                  if args.stand_in else {"encoder": "plip"})
        cfg = EmbedConfig(**enc_kw, precision=args.precision, batch_size=args.batch_size)
        if args.check:
            results["check"] = check_equivalence(cfg, tmp, 4096)
        rows = make_cohort(folder, args.n_slides, args.files_per_kind, args.px_40x, args.px_20x, args.big,
                           args.big_px_40x, args.big_px_20x)
        results["reader_costs"] = {k: reader_costs(next(r["path"] for r in rows if r["kind"] == k))
                                   for k in ("40x", "20x")}
        t0 = time.perf_counter()
        ensure_ray(None, log_to_driver=False)
        results["ray_start_s"] = round(time.perf_counter() - t0, 3)
        results["ray_resources"] = ray.cluster_resources()
        runs = []
        for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
            opts = {"num_readers": args.num_readers} if engine == "pipelined" else {}
            r = run_engine(engine, rows, os.path.join(tmp, f"store_{engine}"), cfg, opts)
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "encoder_loops"}), flush=True)
        ray.shutdown()
    results["runs"] = runs
    n_tiles = runs[0]["tiles"]
    print(f"\n{'engine':10s} {'tiles':>8s} {'wall s':>8s} {'tiles/s':>9s} {'steady/s':>9s} {'start s':>8s} "
          f"{'enc idle':>8s}")
    for r in runs:
        steady = r.get("encoder_clock_tiles_per_s") or 0.0
        r["steady_tiles_per_s"] = steady
        idle = r.get("device_idle_share")
        print(f"{r['engine']:10s} {r['tiles']:8d} {r['seconds']:8.1f} {r['tiles_per_s']:9.1f} {steady:9.1f} "
              f"{r.get('first_slide_s') or 0:8.1f} {'-' if idle is None else f'{idle:.1%}':>8s}")
        if steady:
            per_slide = n_tiles / len(rows)
            r["projection_1000_slides_min"] = round((1000 * per_slide / steady + (r.get("first_slide_s") or 0)) / 60, 1)
    ref = next((r for r in runs if r["engine"] == "slide"), None)
    if ref is not None and runs[0] is not ref and ref["tiles_per_s"]:
        results["ratio_wall"] = round(runs[0]["tiles_per_s"] / ref["tiles_per_s"], 3)
        s0, s1 = runs[0].get("steady_tiles_per_s"), ref.get("steady_tiles_per_s")
        results["ratio_steady"] = round(s0 / s1, 3) if s0 and s1 else None
        print(f"\n{runs[0]['engine']} / slide: {results['ratio_wall']:.2f}x wall, {results['ratio_steady']}x steady "
              f"state ({results['device']}, Ray start-up {results['ray_start_s']:.1f} s not included)")
    for r in runs:
        if "projection_1000_slides_min" in r:
            print(f"{r['engine']}: 1,000 slides x {n_tiles / len(rows):.0f} tiles -> {r['projection_1000_slides_min']} min")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
