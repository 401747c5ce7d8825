"""GPU check of `her2ray score`: the same cohort scored by GPU actors and CPU actors must agree; prints throughput.

Official-size KAT folds (dim 256, depth 4, 8 heads, npk 144), PLIP-size features (dim 512), slides of
``--tiles`` tiles. Run on a machine with a GPU:  python benchmarks/score_gpu_check.py --slides 40
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=40)
    ap.add_argument("--tiles", type=int, default=3000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--gpu-actors", type=int, default=2)
    ap.add_argument("--cpu-actors", type=int, default=4)
    ap.add_argument("--engine-only", action="store_true",
                    help="no Ray: the actors' engine (FoldEnsemble) on cuda vs cpu, slide by slide")
    args = ap.parse_args()
    if args.engine_only:
        return engine_check(args)

    import numpy as np
    import pyarrow.parquet as pq
    import ray
    import torch

    import test_scoring as ts
    from her2ray.labels import PROB_COLUMNS
    from her2ray.scoring.pipeline import ScoreConfig, score_cohort

    print(f"torch {torch.__version__}, cuda available {torch.cuda.is_available()}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}", flush=True)
    ts.KAT_HP = {"dim": 256, "depth": 4, "heads": 8, "dim_head": 64, "mlp_dim": 512, "npk": 144,
                 "dropout": 0.5, "emb_dropout": 0.0}
    root = tempfile.mkdtemp(prefix="score_gpu_")
    store = os.path.join(root, "store")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(args.slides):
        ts.write_slide(store, f"G{i:04d}", args.tiles + 37 * i, 512, rng, tile=256.5, cols=60)
    run = ts.make_run(os.path.join(root, "run"), dim=512, n_folds=args.folds, model="kat")
    print(f"setup {time.perf_counter() - t0:.1f} s", flush=True)
    ray.init(include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.abspath(os.path.join(HERE, ".."))}})
    results = {}
    runs = [("gpu", {"gpus_per_actor": 1.0 / args.gpu_actors, "actors": args.gpu_actors}),
            ("cpu", {"actors": args.cpu_actors, "cpus_per_actor": 2.0})]
    if not torch.cuda.is_available():
        runs = [("cpu0", {"actors": 1}), ("cpu", {"actors": args.cpu_actors, "cpus_per_actor": 1.0})]
    for name, kw in runs:
        t = time.perf_counter()
        s = score_cohort(ScoreConfig(features=store, model=run, out=os.path.join(root, name), attention=True,
                                     batch_slides=4, progress=False, **kw))
        dt = time.perf_counter() - t
        print(f"{name}: scored {s.n_scored}/{s.n_requested} ({s.n_failed} failed) in {dt:.1f} s "
              f"= {s.n_scored / dt:.2f} slides/s (actor start included)", flush=True)
        results[name] = pq.read_table(os.path.join(root, name, "predictions.parquet")).to_pandas()
    g, c = results[runs[0][0]].set_index("slide_id"), results["cpu"].set_index("slide_id")
    diff = np.abs(g[list(PROB_COLUMNS)].to_numpy() - c.loc[g.index, list(PROB_COLUMNS)].to_numpy()).max()
    att = max(np.abs(pq.read_table(g.loc[s, "attention_url"]).column("score").to_numpy()
                     - pq.read_table(c.loc[s, "attention_url"]).column("score").to_numpy()).max() for s in g.index)
    print(f"max |p_gpu - p_cpu| = {diff:.2e}; max attention diff = {att:.2e}; "
          f"pred agree {(g['pred_score'] == c.loc[g.index, 'pred_score']).mean():.3f}", flush=True)
    assert diff < 1e-4 and att < 1e-4


def engine_check(args) -> None:
    """What each Ray actor runs, without Ray: same slides through FoldEnsemble on cuda and on cpu."""
    import numpy as np
    import torch

    import test_scoring as ts
    from her2ray.features.schema import feature_url, read_slide_features
    from her2ray.scoring.engine import FoldEnsemble, score_features

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, device {dev} "
          f"{torch.cuda.get_device_name(0) if dev == 'cuda' else ''}", flush=True)
    ts.KAT_HP = {"dim": 256, "depth": 4, "heads": 8, "dim_head": 64, "mlp_dim": 512, "npk": 144,
                 "dropout": 0.5, "emb_dropout": 0.0}
    root = tempfile.mkdtemp(prefix="score_gpu_")
    store = os.path.join(root, "store")
    rng = np.random.default_rng(0)
    ids = [f"G{i:04d}" for i in range(args.slides)]
    for i, sid in enumerate(ids):
        ts.write_slide(store, sid, args.tiles + 37 * i, 512, rng, tile=256.5, cols=60)
    run = ts.make_run(os.path.join(root, "run"), dim=512, n_folds=args.folds, model="kat")
    out = {}
    for name in dict.fromkeys([dev, "cpu"]):
        torch.set_num_threads(8)
        ens = FoldEnsemble.from_run(run, device=name)
        rows, t_model, t_all = [], 0.0, time.perf_counter()
        for sid in ids:
            sf = read_slide_features(feature_url(store, sid))
            t = time.perf_counter()
            fields, table = score_features(ens, sf, attention=True)
            if name == "cuda":
                torch.cuda.synchronize()
            t_model += time.perf_counter() - t
            rows.append((np.array([fields[c] for c in ts.PROB_COLUMNS]), table.column("score").to_numpy()))
        t_all = time.perf_counter() - t_all
        print(f"{name}: {len(ids)} slides x {args.folds} folds, kernels+model {t_model / len(ids) * 1e3:.0f} ms/slide, "
              f"total {t_all:.1f} s", flush=True)
        out[name] = rows
    if dev == "cuda":
        dp = max(np.abs(a[0] - b[0]).max() for a, b in zip(out["cuda"], out["cpu"]))
        da = max(np.abs(a[1] - b[1]).max() for a, b in zip(out["cuda"], out["cpu"]))
        same = np.mean([a[0].argmax() == b[0].argmax() for a, b in zip(out["cuda"], out["cpu"])])
        print(f"max |p_cuda - p_cpu| = {dp:.2e}; max attention diff = {da:.2e}; same prediction {same:.3f}")
        assert dp < 1e-4 and da < 1e-4


if __name__ == "__main__":
    main()
