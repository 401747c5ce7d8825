"""Cost of KAT at slide scale: build_kernels time, and one training step's time and peak memory.

Why: KAT attention is O(n*m) with m ~ n/npk, i.e. quadratic in tiles per slide, and the official pipeline
discards tiles (grid down-sampling to <= ~max_nodes) to bound it. This measures what a step costs with the
official down-sampling (max_nodes=4096) and without it (max_nodes=n), so the MAX_NODES choice can be made
with numbers.

Each (tiles, mode) case runs in a fresh subprocess so peak-memory readings do not mix. CPU peak memory is
the process RSS high-water mark during the step above the RSS just before it (Linux ``clear_refs``); on
CUDA it is ``torch.cuda.max_memory_allocated`` above the allocation before the step.

    python3 benchmarks/kat_step.py                         # CPU: 1k/10k/50k, official + full (1k, 10k)
    python3 benchmarks/kat_step.py --device cuda --full-max 50000 --amp bf16
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STRIDE_PX = 512.0


def tissue_coords(n_tiles: int, seed: int = 0) -> np.ndarray:
    """(x, y) level-0 px of n_tiles grid tiles in an elliptical blob (aspect 4:3), like a tissue section."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_tiles / (np.pi / 4) / 0.75))) + 4
    rows, cols = int(side * 0.75) + 4, side
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    d = ((rr - rows / 2) / (rows / 2)) ** 2 + ((cc - cols / 2) / (cols / 2)) ** 2
    order = np.argsort(d.ravel() + rng.random(d.size) * 1e-3)[:n_tiles]
    r, c = rr.ravel()[order], cc.ravel()[order]
    return np.stack([c * STRIDE_PX, r * STRIDE_PX], axis=1).astype(np.int64)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_case(n_tiles: int, max_nodes: int, device: str, amp: str, steps: int, patch_dim: int,
             threads: int | None) -> dict:
    import torch

    import sklearn.cluster  # noqa: F401  (import outside the timed region)

    from her2ray.models.kat import KernelAttentionTransformer, build_kernels

    if threads:
        torch.set_num_threads(threads)
    coords = tissue_coords(n_tiles)
    t0 = time.perf_counter()
    plan = build_kernels(coords, STRIDE_PX, npk=144, max_nodes=max_nodes)
    build_s = time.perf_counter() - t0

    torch.manual_seed(0)
    dev = torch.device(device)
    model = KernelAttentionTransformer(patch_dim, 4).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    feats = torch.randn(1, plan.n_tiles, patch_dim, device=dev)
    dist = torch.from_numpy(plan.anchor_dist)[None].to(dev)
    tmask = torch.ones(1, plan.n_tiles, dtype=torch.bool, device=dev)
    kmask = torch.ones(1, plan.n_kernels, dtype=torch.bool, device=dev)
    label = torch.tensor([1], device=dev)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(feats, dist, tmask, kmask), label)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocates Adam state)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes("VmRSS")
        peak_ok = _reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (_rss_bytes("VmHWM") - base) if peak_ok else -1
    return {"n_tiles_slide": n_tiles, "max_nodes": max_nodes, "down_factor": plan.down_factor,
            "n_tiles_model": plan.n_tiles, "n_kernels": plan.n_kernels, "build_kernels_s": round(build_s, 3),
            "step_s_median": round(float(np.median(times)), 4), "step_s_min": round(float(min(times)), 4),
            "peak_step_mem_mib": round(peak / 2 ** 20, 1), "device": device, "amp": amp,
            "threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "attention_elems_per_map": 8 * plan.n_tiles * plan.n_kernels}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 50_000])
    ap.add_argument("--full-max", type=int, default=10_000,
                    help="also run without down-sampling (max_nodes = n) for slides up to this many tiles")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--patch-dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)   # internal: one case, JSON to stdout
    args = ap.parse_args(argv)

    if args.case:
        n, max_nodes = (int(v) for v in args.case.split(":"))
        print(json.dumps(run_case(n, max_nodes, args.device, args.amp, args.steps, args.patch_dim, args.threads)))
        return 0

    cases = [(n, 4096) for n in args.sizes] + [(n, n) for n in args.sizes if 4096 < n <= args.full_max]
    results = []
    for n, max_nodes in cases:
        cmd = [sys.executable, __file__, "--case", f"{n}:{max_nodes}", "--device", args.device, "--amp", args.amp,
               "--steps", str(args.steps), "--patch-dim", str(args.patch_dim)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            res = {"n_tiles_slide": n, "max_nodes": max_nodes, "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(json.dumps(res), flush=True)

    print("\n| slide tiles | max_nodes | df | model tiles | kernels | build_kernels s | step s (median) "
          "| peak step mem MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['n_tiles_slide']} | {r['max_nodes']} | error: {r['error']} |")
            continue
        print(f"| {r['n_tiles_slide']} | {r['max_nodes']} | {r['down_factor']} | {r['n_tiles_model']} "
              f"| {r['n_kernels']} | {r['build_kernels_s']} | {r['step_s_median']} | {r['peak_step_mem_mib']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
