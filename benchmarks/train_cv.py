"""Benchmark of ``her2ray train``: folds concurrently vs sequentially on Ray, and epoch time per 1k slides.

Why: the fold layer's value is wall time (k folds at once on one node/GPU instead of one after another),
and capacity planning needs the cost of an epoch per 1,000 slides with the official KAT sizes.

Two measurements on one synthetic feature store (planted signal, real feature-file contract):
1. engine: ``loop.train_fold`` without Ray on one split (80% train / 20% val), per-epoch seconds. Epoch 0
   includes reading features and building KAT kernel plans (KMeans); later epochs use the in-memory cache.
   Reported per 1,000 slides (train + val slides each epoch).
2. Ray: the same k-fold run twice through ``train_cv`` (real Ray Train, one TorchTrainer per fold):
   ``max_concurrent_folds=0`` (all at once) and ``=1`` (sequential); patience >= epochs so both do the
   identical work. Ratio = sequential wall / concurrent wall.

Usage: python benchmarks/train_cv.py --n-slides 200 --tiles 1024 --dim 512 --epochs 3 --folds 5 \
          --cpus-per-fold 2 --gpus-per-fold 0.2 --out /tmp/her2ray-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/her2ray-bench-train")
    ap.add_argument("--n-slides", type=int, default=100)
    ap.add_argument("--tiles", type=int, default=256, help="tiles per slide")
    ap.add_argument("--dim", type=int, default=512, help="feature dim (PLIP: 512)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--model", default="kat", choices=("kat", "abmil"))
    ap.add_argument("--small", action="store_true", help="tiny model (dim 64, depth 2) instead of official sizes")
    ap.add_argument("--cpus-per-fold", type=float, default=1.0)
    ap.add_argument("--gpus-per-fold", type=float, default=0.0)
    ap.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()

    import torch

    from her2ray.features.schema import feature_url
    from her2ray.training.config import TrainConfig
    from her2ray.training.loop import FoldSpec, train_fold
    from her2ray.training.synthetic import make_feature_store

    shutil.rmtree(args.out, ignore_errors=True)
    store = os.path.join(args.out, "store")
    t0 = time.time()
    info = make_feature_store(store, n_slides=args.n_slides, n_tiles=args.tiles, dim=args.dim, seed=0, signal=4.0)
    gen_s = time.time() - t0
    hp = dict(dim=64, depth=2, heads=4, dim_head=16, mlp_dim=128, npk=16) if args.small else {}
    cfg = TrainConfig(model=args.model, folds=args.folds, max_epochs=args.epochs, patience=args.epochs + 1,
                      cpus_per_fold=args.cpus_per_fold, gpus_per_fold=args.gpus_per_fold, **hp)
    device = "cuda" if torch.cuda.is_available() and args.gpus_per_fold > 0 else "cpu"
    result = {"n_slides": args.n_slides, "tiles_per_slide": args.tiles, "feature_dim": args.dim,
              "model": args.model, "hparams": cfg.model_hparams(), "batch_size": cfg.batch_size,
              "epochs": args.epochs, "folds": args.folds, "device": device,
              "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "generate_s": gen_s}

    if not args.skip_engine:
        rows = info["rows"]
        cut = int(0.8 * len(rows))
        from her2ray.labels import parse_her2_score

        def part(rs):
            return ([r["slide_id"] for r in rs], [feature_url(store, r["slide_id"]) for r in rs],
                    [parse_her2_score(r["her2_score"]) for r in rs])

        (ti, tu, tl), (vi, vu, vl) = part(rows[:cut]), part(rows[cut:])
        spec = FoldSpec(fold=0, out_dir=os.path.join(args.out, "engine"), config=cfg.to_dict(), patch_dim=args.dim,
                        seed=0, train_ids=ti, train_urls=tu, train_labels=tl, val_ids=vi, val_urls=vu, val_labels=vl)
        t0 = time.time()
        res = train_fold(spec, device=device)
        secs = [h["seconds"] for h in res["history"]]
        steady = sum(secs[1:]) / max(1, len(secs) - 1) if len(secs) > 1 else secs[0]
        result["engine"] = {"wall_s": time.time() - t0, "epoch_s": secs, "first_epoch_s": secs[0],
                            "steady_epoch_s": steady,
                            "steady_epoch_s_per_1k_slides": steady / args.n_slides * 1000,
                            "first_epoch_s_per_1k_slides": secs[0] / args.n_slides * 1000}
        print(json.dumps({"engine": result["engine"]}, indent=1), flush=True)

    if not args.skip_ray:
        import ray

        from her2ray.training.run import train_cv

        t0 = time.time()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}})
        result["ray_init_s"] = time.time() - t0
        walls = {}
        for mode, conc in (("concurrent", 0), ("sequential", 1)):
            run_cfg = cfg.model_copy(update={"max_concurrent_folds": conc})
            t0 = time.time()
            summary = train_cv(store, info["manifest"], os.path.join(args.out, f"run-{mode}"), run_cfg)
            walls[mode] = time.time() - t0
            spans = [(f["started_at"], f["finished_at"]) for f in summary["folds"].values()]
            result[f"ray_{mode}"] = {"wall_s": walls[mode], "val_auc_mean": summary["val_auc_mean"],
                                     "fold_train_fn_s": [round(e - s, 2) for s, e in spans]}
            print(json.dumps({mode: result[f"ray_{mode}"]}), flush=True)
        result["sequential_over_concurrent"] = walls["sequential"] / walls["concurrent"]
        ray.shutdown()

    with open(os.path.join(args.out, "bench.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
