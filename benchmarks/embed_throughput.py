"""Embedding throughput: her2ray's engine vs a CLAM-style baseline, same slides, same encoder, one run.

What is compared (both include tissue tiling, encoding and writing one feature file per slide):

* **her2ray** ``embed_slide``: strips of adjacent tiles read with one ``read_region`` each, in a thread pool,
  the next batch read in the background while the encoder runs; uint8 tiles go to the device, resize and
  normalisation run there; bf16/fp16 autocast on GPU.
* **CLAM-style** (``extract_features_fp.py`` shape): a torch ``Dataset`` that calls OpenSlide
  ``read_region`` once per tile, PIL -> torchvision ``Resize(bicubic)/ToTensor/Normalize`` on the CPU in
  ``DataLoader`` workers, float32 model.

Reported per engine: tiles/s and the share of the loop the encoder spent waiting for input
(``wait / (wait + encode)``), then the ratio her2ray / baseline. ``--tower`` also times the image tower
alone on device-resident input (images/s at ``--tower-batch``) for the given precisions.

    python3 benchmarks/embed_throughput.py --tiny                  # CPU, tiny encoder: exposes the I/O path
    python3 benchmarks/embed_throughput.py --device cuda --synth 1 --synth-px 24576 \
        --read-workers 16 --baseline-workers 16 --tower bf16,fp16,bf16-pure,fp32

Runs without Ray (the GPU box has none).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY_CFG = {"embed_dim": 64, "quick_gelu": True,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 32}}


# --------------------------------------------------------------------------------------------------
# Inputs

def make_big_slide(path: str, width_px: int, height_px: int, seed: int = 0, mpp: float = 0.5,
                   level_step: int = 2) -> str:
    """A large pyramidal JPEG TIFF, fast: tissue blobs filled with tiles copied from a small rendered
    synthetic slide (rendering every tile of a 25k px slide with the painter would take minutes)."""
    from her2ray.synth import write_synthetic_slide
    from her2ray.synth.pyramid import write_pyramidal_tiff

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        small = write_synthetic_slide(os.path.join(tmp, "pool.tiff"), 2048, 2048, seed=seed, tissue_share=0.9)
        import openslide

        with openslide.OpenSlide(small) as s:
            pool = [np.asarray(s.read_region((c * 256, r * 256), 0, (256, 256)).convert("RGB"))
                    for r in range(8) for c in range(8)]
    pool = [t for t in pool if t.mean() < 225] or pool
    white = np.full((256, 256, 3), 242, np.uint8)
    n_cols, n_rows = math.ceil(width_px / 256), math.ceil(height_px / 256)
    yy, xx = np.mgrid[0:n_rows, 0:n_cols]
    tissue = np.zeros((n_rows, n_cols), bool)
    for _ in range(4):                                   # a few elliptical tissue pieces, ~50% of the slide
        cy, cx = rng.uniform(0.25, 0.75) * n_rows, rng.uniform(0.25, 0.75) * n_cols
        ry, rx = rng.uniform(0.2, 0.35) * n_rows, rng.uniform(0.2, 0.35) * n_cols
        tissue |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    choice = rng.integers(0, len(pool), size=(n_rows, n_cols))

    def render(col: int, row: int) -> np.ndarray:
        return pool[choice[row, col]] if tissue[row, col] else white

    return write_pyramidal_tiff(path, width_px, height_px, render, mpp=mpp, tile_px=256, jpeg_quality=85,
                                level_step=level_step)


def tiny_encoder_dir(folder: str) -> str:
    import torch
    from open_clip.model import _build_vision_tower

    from her2ray.encoders import write_open_clip_dir

    torch.manual_seed(0)
    tower = _build_vision_tower(TINY_CFG["embed_dim"], TINY_CFG["vision_cfg"], quick_gelu=True)
    return write_open_clip_dir(tower.state_dict(), TINY_CFG, folder)


# --------------------------------------------------------------------------------------------------
# Engines

def run_her2ray(slides: list[str], cfg, store: str) -> dict:
    from her2ray.features.embed import embed_slide, load_engine_encoder

    encoder = load_engine_encoder(cfg)
    _warmup(encoder)
    tiles = wait = encode = 0.0
    t0 = time.perf_counter()
    for i, path in enumerate(slides):
        st = embed_slide({"slide_id": f"s{i}", "path": path}, encoder, cfg, store)
        if st["status"] != "ok":
            raise RuntimeError(f"her2ray engine failed on {path}: {st['error']}")
        tiles += st["n_tiles"]
        wait += st["read_wait_s"]
        encode += st["encode_s"]
    seconds = time.perf_counter() - t0
    return {"engine": "her2ray", "tiles": int(tiles), "seconds": seconds, "wait_s": wait, "encode_s": encode,
            "precision": encoder.precision, "batch_size": encoder.batch_size,
            "read_workers": cfg.read_workers}


class ClamStyleTiles:
    """torch Dataset: one OpenSlide ``read_region`` per tile, CPU transforms (opened lazily per worker)."""

    def __init__(self, path, coords, level, read_px, tile_px, input_size, mean, std):
        from torchvision import transforms

        self.path, self.coords, self.level, self.read_px, self.tile_px = path, coords, level, read_px, tile_px
        self.wsi = None
        self.tf = transforms.Compose([
            transforms.Resize(input_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size), transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self):
        return len(self.coords)

    def __getitem__(self, i):
        import openslide

        if self.wsi is None:
            self.wsi = openslide.OpenSlide(self.path)
        x, y = self.coords[i]
        img = self.wsi.read_region((int(x), int(y)), self.level, (self.read_px, self.read_px)).convert("RGB")
        if self.read_px != self.tile_px:
            img = img.resize((self.tile_px, self.tile_px))
        return self.tf(img)


def run_baseline(slides: list[str], cfg, store: str, num_workers: int, batch_size: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from her2ray import storage
    from her2ray.encoders import load_encoder
    from her2ray.features.schema import FeatureFileMeta, build_feature_table, feature_url
    from her2ray.slides import open_slide
    from her2ray.tiling import plan_tiles

    kw = cfg.encoder_kwargs()
    kw.update(precision="fp32")
    encoder = load_encoder(**kw)
    _warmup(encoder)
    dev = encoder.device
    tiles = wait = encode = 0.0
    t0 = time.perf_counter()
    for i, path in enumerate(slides):
        with open_slide(path) as reader:
            grid = plan_tiles(reader, cfg.tiling, keep_mask=False)
        ds = ClamStyleTiles(path, grid.coords, grid.level, grid.read_px, grid.tile_px, encoder.input_size,
                            encoder.identity["preprocess"]["mean"], encoder.identity["preprocess"]["std"])
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, pin_memory=dev.type == "cuda",
                            persistent_workers=False)
        feats = []
        it = iter(loader)
        while True:
            tw = time.perf_counter()
            batch = next(it, None)
            te = time.perf_counter()
            wait += te - tw
            if batch is None:
                break
            with torch.inference_mode():
                feats.append(encoder(batch.to(dev, non_blocking=True)).cpu().numpy())
            encode += time.perf_counter() - te
        f = np.concatenate(feats)
        meta = FeatureFileMeta(slide_id=f"b{i}", encoder=encoder.settings_identity(), tile_px=grid.tile_px,
                               target_mpp=grid.target_mpp, slide_mpp=grid.slide_mpp, level=grid.level,
                               tile_size_level0_px=grid.tile_size_level0_px)
        storage.write_parquet_atomic(build_feature_table(f"b{i}", grid.x, grid.y, grid.tissue_fraction, f, meta),
                                     feature_url(store, f"b{i}"))
        tiles += len(grid)
    seconds = time.perf_counter() - t0
    return {"engine": "clam-style", "tiles": int(tiles), "seconds": seconds, "wait_s": wait, "encode_s": encode,
            "precision": "fp32", "batch_size": batch_size, "read_workers": num_workers}


def _warmup(encoder) -> None:
    import torch

    encoder.embed_tiles(np.zeros((min(8, encoder.batch_size), 256, 256, 3), np.uint8))
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()


def tower_bench(cfg, precisions: list[str], batch: int, iters: int) -> list[dict]:
    """Image tower alone on device-resident normalised input: images/s per precision."""
    import torch

    from her2ray.encoders import load_encoder

    out = []
    for p in precisions:
        kw = cfg.encoder_kwargs()
        kw.update(precision=p)
        enc = load_encoder(**kw)
        x = torch.randn(batch, 3, enc.input_size, enc.input_size, device=enc.device)
        sync = torch.cuda.synchronize if enc.device.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            for _ in range(3):
                enc(x)
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                enc(x)
            sync()
        dt = time.perf_counter() - t0
        out.append({"precision": p, "batch": batch, "images_per_s": batch * iters / dt})
        print(f"tower {enc.identity['architecture']} {p:10s} batch {batch}: {batch * iters / dt:10.0f} images/s",
              flush=True)
        del enc, x
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", nargs="*", default=[], help="slide files (default: synthetic ones)")
    ap.add_argument("--synth", type=int, default=2, help="synthetic slides to generate when --slides is empty")
    ap.add_argument("--synth-px", type=int, default=6144, help="edge of each synthetic slide (level-0 px)")
    ap.add_argument("--repeat", type=int, default=1, help="process the slide list this many times per engine")
    ap.add_argument("--tiny", action="store_true", help="tiny random ViT instead of PLIP (exposes I/O on CPU)")
    ap.add_argument("--encoder", default="plip")
    ap.add_argument("--weights", default=None, help="default: random weights (throughput does not depend on them)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default=None, help="her2ray engine precision (default: bf16 GPU / fp32 CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="her2ray tiles per batch (default 1024 GPU / 64 CPU)")
    ap.add_argument("--read-workers", type=int, default=None, help="her2ray read threads (default min(8, CPUs))")
    ap.add_argument("--baseline-workers", type=int, default=None, help="DataLoader workers (default: CPUs, max 8)")
    ap.add_argument("--baseline-batch", type=int, default=256)
    ap.add_argument("--tower", default="", help="comma list of precisions for the tower-only benchmark")
    ap.add_argument("--tower-batch", type=int, default=1024)
    ap.add_argument("--tower-iters", type=int, default=10)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--json", default=None, help="write all numbers to this JSON file")
    args = ap.parse_args(argv)

    import torch

    from her2ray.features.embed import EmbedConfig
    from her2ray.tiling import default_workers

    results: dict = {"device": None, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="her2ray-bench-") as tmp:
        enc_kw = {"encoder": args.encoder, "weights": args.weights}
        if args.tiny:
            enc_kw = {"encoder": "open_clip", "weights": tiny_encoder_dir(os.path.join(tmp, "tiny"))}
        cfg = EmbedConfig(**enc_kw, device=args.device, precision=args.precision, batch_size=args.batch_size,
                          read_workers=args.read_workers)
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        results["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{os.cpu_count()}"
        print(f"device: {results['device']}  torch {torch.__version__}  encoder {cfg.encoder}"
              f"{' (tiny)' if args.tiny else ''}", flush=True)
        if args.tower:
            results["tower"] = tower_bench(cfg, [p.strip() for p in args.tower.split(",") if p.strip()],
                                           args.tower_batch, args.tower_iters)
        slides = list(args.slides)
        if not slides:
            t0 = time.perf_counter()
            slides = [make_big_slide(os.path.join(tmp, f"synth{i}.tiff"), args.synth_px, args.synth_px, seed=i)
                      for i in range(args.synth)]
            print(f"generated {len(slides)} synthetic slide(s) of {args.synth_px}^2 px in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        slides = slides * max(1, args.repeat)
        runs = [run_her2ray(slides, cfg, os.path.join(tmp, "store_h2r"))]
        if not args.skip_baseline:
            workers = args.baseline_workers or default_workers()
            runs.append(run_baseline(slides, cfg, os.path.join(tmp, "store_clam"), workers, args.baseline_batch))
    print(f"\n{'engine':12s} {'tiles':>7s} {'seconds':>8s} {'tiles/s':>9s} {'wait share':>10s}  precision batch workers")
    for r in runs:
        r["tiles_per_s"] = r["tiles"] / r["seconds"]
        r["wait_share"] = r["wait_s"] / max(r["wait_s"] + r["encode_s"], 1e-9)
        print(f"{r['engine']:12s} {r['tiles']:7d} {r['seconds']:8.2f} {r['tiles_per_s']:9.1f} "
              f"{r['wait_share']:10.1%}  {r['precision']:9s} {r['batch_size']:5} {r['read_workers']}")
    results["runs"] = runs
    if len(runs) == 2:
        results["ratio"] = runs[0]["tiles_per_s"] / runs[1]["tiles_per_s"]
        print(f"\nher2ray / clam-style throughput ratio: {results['ratio']:.2f}x  ({results['device']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
