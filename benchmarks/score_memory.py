"""Driver memory of `her2ray score` vs cohort size: is it flat in the features (only tiny rows grow)?

Generates N small feature files (20 tiles, dim 32) hard-linked from one pool, a 1-fold run, and scores
10 (warm-up), then each N on one local Ray; prints the driver's tracemalloc peak and RSS high-water mark.

    python benchmarks/score_memory.py --sizes 100 1000 10000 --model abmil
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--model", default="abmil", choices=("kat", "abmil"))
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--dim", type=int, default=32)
    args = ap.parse_args()

    import ray

    from test_scoring import make_run, make_store  # the test helpers write contract-conformant files

    from her2ray.features.schema import feature_url
    from her2ray.scoring.pipeline import ScoreConfig, score_cohort

    root = tempfile.mkdtemp(prefix="score_mem_")
    n_max = max(args.sizes)
    ids = [f"T{i:06d}" for i in range(n_max)]
    t0 = time.perf_counter()
    pool = make_store(os.path.join(root, "pool"), ids, dim=args.dim, catalog=False)
    run = make_run(os.path.join(root, "run"), dim=args.dim, n_folds=1, model=args.model)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))}})

    def store_of(n: int) -> str:
        store = os.path.join(root, f"s{n}")
        os.makedirs(os.path.join(store, "features"))
        for sid in ids[:n]:
            os.link(feature_url(pool, sid), feature_url(store, sid))   # real per-slide files, no copy
        return store

    print(f"setup {time.perf_counter() - t0:.1f} s", flush=True)
    for n in [10, *args.sizes]:
        store = store_of(n)
        gc.collect()
        tracemalloc.start()
        t = time.perf_counter()
        s = score_cohort(ScoreConfig(features=store, model=run, out=os.path.join(root, f"o{n}"), actors=args.actors,
                                     batch_slides=16, progress=False))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"N={n:6d}: scored {s.n_scored}, failed {s.n_failed}, {time.perf_counter() - t:6.1f} s, "
              f"driver tracemalloc peak {peak / 1e6:6.2f} MB, driver max RSS {rss:7.1f} MB", flush=True)


if __name__ == "__main__":
    main()
