"""Archival formats: what the bounded thumbnail and the DICOM fast path buy, each against its baseline
measured in the same run.

1. Thumbnail peak memory of a dense single-level slide (default 12,288 x 12,288 px JPEG, written once into
   ``--workdir``): her2ray's region-by-region thumbnail vs the old rule (decode the whole level, then resize),
   each in a fresh subprocess (peak RSS = ``ru_maxrss``, minus the same process's RSS before the thumbnail).
   Pixels of the two thumbnails are compared (mean absolute difference, grey levels).
2. DICOM WSI tile reads (tests/data/cmu1_small_dicom, the real CMU slide as DICOM): process CPU per grid
   tile through the direct JPEG-frame decoder vs through OpenSlide (``HER2RAY_FAST_TIFF=0``), one thread,
   fresh handles, best of ``--repeats``; pixels must be identical.

CPU times and wall times depend on other load on the machine; the load average is printed.

    python3 benchmarks/archival_read.py [--size 12288] [--workdir /tmp/her2ray-bench] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from her2ray.slides import open_slide  # noqa: E402
from her2ray.tiling import TilingConfig, plan_tiles, read_tiles  # noqa: E402

_THUMB = """
import json, resource, sys, time
import numpy as np
import her2ray.slides.base as base
from her2ray.slides import open_slide
if sys.argv[2] == "whole":
    base.DIRECT_THUMBNAIL_MAX_PX = 1 << 62          # the old rule: every level is decoded whole
with open_slide(sys.argv[1]) as s:
    s.level_count
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    thumb = s.thumbnail(int(sys.argv[3]))
    seconds = time.perf_counter() - t0
np.save(sys.argv[4], thumb)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "added_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                  "seconds": seconds}))
"""


def thumbnail_memory(path: str, workdir: Path, max_px: int = 1536) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = {}
    for mode in ("whole", "bounded"):
        npy = workdir / f"thumb-{mode}.npy"
        done = subprocess.run([sys.executable, "-c", _THUMB, path, mode, str(max_px), str(npy)],
                              capture_output=True, text=True, env=env, check=True)
        out[mode] = {**json.loads(done.stdout.strip().splitlines()[-1]), "thumb": np.load(npy)}
    diff = np.abs(out["whole"]["thumb"].astype(int) - out["bounded"]["thumb"].astype(int))
    return {m: {k: round(v, 3) for k, v in r.items() if k != "thumb"} for m, r in out.items()} | {
        "thumb_shape": list(out["bounded"]["thumb"].shape), "mean_abs_diff": round(float(diff.mean()), 3),
        "peak_ratio_whole_over_bounded": round(out["whole"]["added_mb"] / max(out["bounded"]["added_mb"], 1), 2)}


def dicom_cpu(folder: str, repeats: int) -> dict:
    def run(fast: bool):
        os.environ["HER2RAY_FAST_TIFF"] = "1" if fast else "0"
        best, tiles = float("inf"), None
        for _ in range(repeats):
            with open_slide(folder) as s:
                assert (s._fast is not None) == fast
                grid = plan_tiles(s, TilingConfig(), keep_mask=False)
                t0 = time.process_time()
                tiles = read_tiles(s, grid, np.arange(len(grid)), num_workers=1)
                best = min(best, time.process_time() - t0)
        return best / len(tiles) * 1e3, tiles

    fast_ms, a = run(True)
    slow_ms, b = run(False)
    os.environ.pop("HER2RAY_FAST_TIFF", None)
    return {"tiles": len(a), "fast_ms_per_tile": round(fast_ms, 3), "openslide_ms_per_tile": round(slow_ms, 3),
            "cpu_ratio_openslide_over_fast": round(slow_ms / fast_ms, 2), "identical": bool(np.array_equal(a, b))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=12288)
    ap.add_argument("--workdir", default="/tmp/her2ray-bench")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()}")
    slide = workdir / f"single-level-{args.size}.tif"
    if not slide.exists():
        from her2ray.synth.formats import write_format_slide

        write_format_slide(str(slide), "jpeg", aperio=False, width_px=args.size, height_px=args.size, mpp=0.25)
    print("thumbnail of a dense single-level slide:",
          json.dumps(thumbnail_memory(str(slide), workdir), indent=1))
    print("DICOM tiles, CPU per tile:", json.dumps(dicom_cpu(str(REPO / "tests" / "data" / "cmu1_small_dicom"),
                                                             args.repeats), indent=1))


if __name__ == "__main__":
    main()
