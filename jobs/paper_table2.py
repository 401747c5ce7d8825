"""`python -m jobs.paper_table2 --config jobs/configs/paper_table2.yaml`: the paper's Table 2 as one job.

For every model (KAT and SlideGraph+ by default) it runs ``her2ray train`` twice on the same feature store:

* ``<model>_a_to_b``: CV on cohort A (``--manifest cohort_a``) with cohort B as the held-out test set
  (``--test-manifest cohort_b``): its validation folds are the "CV on A" column and its fold models tested on
  B are the "train A, test B" column;
* ``<model>_cv_b``: CV on cohort B;

then ``her2ray compare`` writes ``table2/table2.md`` (+ JSON, ROC figure, paired comparison). With
``embed`` among the stages it first embeds both cohorts into ``features`` (``her2ray embed`` on their union).
Same seed and folds for both models, so the paired comparison is on the same folds. Each step is its own
``her2ray`` process on the Ray cluster named by ``ray.address`` / ``$RAY_ADDRESS`` (else a local Ray).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any, Literal

from pydantic import Field

from her2ray import storage
from her2ray.config import StageConfig, load_yaml
from her2ray.errors import ConfigError
from jobs._common import RayOptions, _actions_by_dest, _emit, _expand, ray_address, run_stage, stage_parser

STAGES = ("embed", "train", "compare")
WIRED = {"embed": {"manifest", "out"}, "train": {"features", "manifest", "test_manifest", "out", "model"},
         "compare": {"runs", "out"}}


class Table2Config(StageConfig):
    features: str                         # feature store holding every slide of both cohorts
    cohort_a: str                         # labelled manifest of cohort A (paper: in-house USTC-BC)
    cohort_b: str                         # labelled manifest of cohort B (paper: TCGA-BRCA)
    out: str
    models: list[Literal["kat", "slidegraph", "abmil"]] = Field(default_factory=lambda: ["kat", "slidegraph"])
    stages: list[Literal["embed", "train", "compare"]] = Field(default_factory=lambda: ["train", "compare"])
    ray: RayOptions = Field(default_factory=RayOptions)
    embed: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)                 # options shared by every model
    model_options: dict[str, dict[str, Any]] = Field(default_factory=dict)   # per-model train options
    compare: dict[str, Any] = Field(default_factory=dict)


def load_config(path: str) -> Table2Config:
    cfg = Table2Config.from_mapping(load_yaml(path), source=path)
    cfg = cfg.model_copy(update={k: _expand(getattr(cfg, k)) for k in ("features", "cohort_a", "cohort_b", "out")})
    unknown = sorted(set(cfg.model_options) - set(cfg.models))
    if unknown:
        raise ConfigError(f"{path}: model_options for model(s) {unknown} not in models {cfg.models}")
    plan(cfg, source=path)   # every option checked before any work starts
    return cfg


def _options(stage: str, options: dict[str, Any], wired: dict[str, Any], *, where: str) -> list[str]:
    """argv for ``her2ray <stage>``: the wired paths plus user options, validated by the stage's own parser."""
    parser = stage_parser(stage, source=where)
    dests = _actions_by_dest(parser)
    tokens: list[str] = []
    for key, value in list(wired.items()) + list(options.items()):
        dest = str(key).replace("-", "_")
        if dest not in dests:
            raise ConfigError(f"{where}: {stage}.{key}: unknown option for 'her2ray {stage}'")
        if key in options and dest in WIRED[stage]:
            raise ConfigError(f"{where}: {stage}.{key}: set by the job; remove it")
        tokens += _emit(dests[dest], value, where=f"{where}: {stage}.{key}")
    return [stage, *tokens]


def run_dir(cfg: Table2Config, model: str, kind: str) -> str:
    return storage.join(cfg.out, f"{model}_{kind}")


def union_manifest(cfg: Table2Config) -> str:
    return storage.join(cfg.out, "manifests", "embed_manifest.csv")


def plan(cfg: Table2Config, *, source: str = "config") -> list[list[str]]:
    """Every ``her2ray`` argv of the job, in order."""
    steps: list[list[str]] = []
    if "embed" in cfg.stages:
        steps.append(_options("embed", cfg.embed, {"manifest": union_manifest(cfg), "out": cfg.features},
                              where=source))
    specs: list[str] = []
    for model in cfg.models:
        opts = {**cfg.train, **cfg.model_options.get(model, {})}
        ab, cvb = run_dir(cfg, model, "a_to_b"), run_dir(cfg, model, "cv_b")
        if "train" in cfg.stages:
            steps.append(_options("train", opts, {"model": model, "features": cfg.features, "manifest": cfg.cohort_a,
                                                  "test_manifest": cfg.cohort_b, "out": ab}, where=source))
            steps.append(_options("train", opts, {"model": model, "features": cfg.features, "manifest": cfg.cohort_b,
                                                  "out": cvb}, where=source))
        specs += [f"cv_a={ab}", f"cv_b={cvb}", f"a_to_b={ab}"]
    if "compare" in cfg.stages:
        steps.append(_options("compare", cfg.compare, {"runs": specs, "out": storage.join(cfg.out, "table2")},
                              where=source))
    return steps


def write_union_manifest(cfg: Table2Config) -> None:
    import pandas as pd

    from her2ray.manifest import read_table

    frames = [read_table(cfg.cohort_a).to_pandas(), read_table(cfg.cohort_b).to_pandas()]
    storage.makedirs(storage.join(cfg.out, "manifests"))
    union = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["slide_id"], keep="first")
    storage.write_text_atomic(union_manifest(cfg), union.to_csv(index=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.paper_table2", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="Table 2 YAML (see jobs/configs/paper_table2.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the her2ray command lines only")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        steps = plan(cfg, source=args.config)
        if args.dry_run:
            for step in steps:
                print("her2ray " + " ".join(shlex.quote(a) for a in step))
            return 0
        t0 = time.perf_counter()
        if "embed" in cfg.stages:
            write_union_manifest(cfg)
        with ray_address(cfg.ray) as address:
            for i, step in enumerate(steps, 1):
                run_stage(step, address=address, index=i, total=len(steps), started_at=t0)
    except ConfigError as exc:
        print(f"jobs.paper_table2: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # StageFailed and friends: say which step, keep the exit status non-zero
        print(f"jobs.paper_table2: {exc}", file=sys.stderr)
        return getattr(exc, "rc", 1) or 1
    print(f"\njobs.paper_table2: Table 2 at {storage.join(cfg.out, 'table2', 'table2.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
