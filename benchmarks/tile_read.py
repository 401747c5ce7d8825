"""Tile reading throughput: her2ray's bulk reader vs a naive per-tile ``read_region`` loop.

Scenarios (one run each, best of ``--repeats`` timings, fresh OpenSlide handles every repetition so both
methods start with a cold decode cache):

* the real Aperio SVS (CMU-1-Small-Region, 240 px JPEG tiles) at its native 0.499 um/px;
* the same slide at 1.0 um/px (level 0 read at 512 px per tile, resized to 256);
* a large synthetic pyramidal slide (default 20000 x 20000 px at 0.5 um/px, written once and kept in
  ``--workdir``).

Three readers, all producing identical pixels (checked):

* naive: what one would write first: per tile, ``OpenSlide.read_region`` -> numpy RGB (+ PIL box
  resize when the read size differs from the tile size);
* OpenSlide strips + threads: her2ray's ``read_tiles`` with the direct TIFF decoding switched off
  (``HER2RAY_FAST_TIFF=0``): one ``read_region`` per strip of adjacent tiles, split with numpy, threads;
* her2ray bulk: ``read_tiles`` as shipped (strips + threads + direct JPEG tile decoding for TIFF slides).

Wall-clock times are sensitive to other load on the machine; the load average is printed.

    python3 benchmarks/tile_read.py [--size 20000] [--workdir /tmp/her2ray-bench] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from her2ray.slides import open_slide  # noqa: E402
from her2ray.tiling import TilingConfig, default_workers, plan_tiles, read_tiles, resize_tile  # noqa: E402


def naive_read(path: str, grid) -> np.ndarray:
    import openslide

    slide = openslide.OpenSlide(path)
    out = np.empty((len(grid), grid.tile_px, grid.tile_px, 3), np.uint8)
    for k in range(len(grid)):
        img = slide.read_region((int(grid.x[k]), int(grid.y[k])), grid.level, (grid.read_px, grid.read_px))
        tile = np.asarray(img.convert("RGB"))
        out[k] = tile if grid.read_px == grid.tile_px else resize_tile(tile, grid.tile_px)
    slide.close()
    return out


def bulk_read(path: str, grid, workers: int, fast_tiff: bool = True) -> np.ndarray:
    """her2ray's reader; ``fast_tiff=False`` forces OpenSlide strip reads (no direct tile decoding)."""
    os.environ["HER2RAY_FAST_TIFF"] = "1" if fast_tiff else "0"
    try:
        with open_slide(path) as s:
            return read_tiles(s, grid, num_workers=workers)
    finally:
        os.environ.pop("HER2RAY_FAST_TIFF", None)


def best_time(fn, repeats: int):
    """(best wall s, best CPU s of this process incl. its threads, result) over ``repeats`` runs."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), result


def scenario(name: str, path: str, cfg: TilingConfig, workers: int, repeats: int) -> dict:
    with open_slide(path) as s:
        grid = plan_tiles(s, cfg)
    t_naive, c_naive, a = best_time(lambda: naive_read(path, grid), repeats)
    t_strip, c_strip, b = best_time(lambda: bulk_read(path, grid, workers, fast_tiff=False), repeats)
    t_bulk, c_bulk, c = best_time(lambda: bulk_read(path, grid, workers), repeats)
    same = bool(np.array_equal(a, b) and np.array_equal(a, c))
    n = len(grid)
    row = {"scenario": name, "tiles": n, "level": grid.level, "read_px": grid.read_px,
           "naive_tiles_per_s": n / t_naive, "openslide_strips_tiles_per_s": n / t_strip,
           "bulk_tiles_per_s": n / t_bulk, "speedup": t_naive / t_bulk, "cpu_speedup": c_naive / c_bulk,
           "identical": same}
    print(f"{name} ({n} tiles, level {grid.level}, {grid.read_px} px read per tile)\n"
          f"    tiles/s wall: naive {n / t_naive:7.1f} | OpenSlide strips+threads {n / t_strip:7.1f} | "
          f"her2ray bulk {n / t_bulk:7.1f}   -> bulk/naive x{t_naive / t_bulk:.2f}\n"
          f"    CPU ms/tile:  naive {1e3 * c_naive / n:7.2f} | OpenSlide strips+threads {1e3 * c_strip / n:7.2f} | "
          f"her2ray bulk {1e3 * c_bulk / n:7.2f}   -> x{c_naive / c_bulk:.2f} less CPU | identical={same}",
          flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="synthetic slide edge in px (level 0)")
    ap.add_argument("--workdir", default="/tmp/her2ray-bench")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--svs", default=str(REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"))
    args = ap.parse_args(argv)

    print(f"CPUs available: {default_workers()}, reader threads: {args.workers}, repeats: {args.repeats}, "
          f"load average: {os.getloadavg()[0]:.1f}")
    rows = [
        scenario("CMU-1-Small-Region @0.499 native", args.svs, TilingConfig(target_mpp=0.499, min_tissue=0.0),
                 args.workers, args.repeats),
        scenario("CMU-1-Small-Region @1.0 (resize)", args.svs, TilingConfig(target_mpp=1.0, min_tissue=0.0),
                 args.workers, args.repeats),
    ]
    from her2ray.synth import write_synthetic_slide

    os.makedirs(args.workdir, exist_ok=True)
    big = os.path.join(args.workdir, f"synthetic_{args.size}.tiff")
    if not os.path.exists(big):
        t0 = time.perf_counter()
        write_synthetic_slide(big, args.size, args.size, mpp=0.5, label=2, seed=1)
        dt = time.perf_counter() - t0
        print(f"wrote {big} ({args.size}x{args.size} px, {os.path.getsize(big) / 1e6:.0f} MB) in {dt:.1f} s "
              f"({args.size * args.size / dt / 1e6:.1f} Mpx/s)", flush=True)
    rows.append(scenario(f"synthetic {args.size}px @0.5 native", big, TilingConfig(), args.workers, args.repeats))
    print("speedup (naive wall time / bulk wall time): "
          + ", ".join(f"{r['scenario']}: x{r['speedup']:.2f}" for r in rows))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
