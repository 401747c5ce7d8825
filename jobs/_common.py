"""Shared machinery of the job entrypoints: validate one YAML run description, wire the stages, run them.

Why it looks like this:

* The YAML schema of a stage section *is* the stage's CLI: keys are the ``her2ray <stage>`` option names
  (``n_epochs`` or ``n-epochs``), checked against the real argparse parser (unknown key, bad type or
  choice -> ``ConfigError`` naming the file and ``stage.key``). So the jobs never drift from the CLI and
  carry no science defaults of their own.
* The paths *between* stages (feature store, training run, predictions, ...) are not user options: they
  are derived from ``out`` by :class:`Layout`, so a pipeline cannot wire stage outputs inconsistently.
* Each stage runs as its own ``her2ray`` process: a stage's ``ray.init()`` then connects to the cluster
  named by ``RAY_ADDRESS`` (set by ``ray job submit`` inside a job, or by us for a local Ray), torch/Ray
  state never leaks from one stage into the next, and the job log shows every stage's own output.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from pydantic import Field

from her2ray import storage
from her2ray.config import StageConfig, load_yaml
from her2ray.errors import ConfigError

#: Every stage a job can run, in pipeline order. (``her2ray tile`` works on one slide, for QC; the
#: cohort-level tiling happens inside ``embed``, so it is not a job stage.)
StageName = Literal["embed", "train", "score", "evaluate", "heatmap"]
ALL_STAGES: tuple[str, ...] = ("embed", "train", "score", "evaluate", "heatmap")
DEFAULT_STAGES: tuple[str, ...] = ALL_STAGES
#: Stages that work on the held-out slides and so need ``test_manifest``.
TEST_STAGES: frozenset[str] = frozenset({"score", "evaluate", "heatmap"})

REPO_ROOT = Path(__file__).resolve().parents[1]


class RayOptions(StageConfig):
    """Where the stages' Ray work runs."""

    #: ``null``: use ``$RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray for this run.
    #: ``auto``: connect to the Ray already running on this node. Or ``host:6379`` / ``ray://host:10001``.
    address: str | None = None
    #: CPUs of the local Ray started when there is no address (``null``: all cores).
    num_cpus: int | None = Field(default=None, ge=1)


class PipelineConfig(StageConfig):
    """One run: inputs, output root, Ray placement and per-stage ``her2ray`` options."""

    manifest: str                       # slides to embed + train on (CSV/Parquet; local or s3://)
    test_manifest: str | None = None    # held-out slides: embedded, scored, evaluated, heatmapped
    out: str                            # output root (local dir or s3:// prefix); see Layout
    stages: list[StageName] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    ray: RayOptions = Field(default_factory=RayOptions)
    embed: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    score: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)
    heatmap: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """Fixed folder layout under ``out``: the only place that decides where each stage writes."""

    out: str

    def _at(self, name: str) -> str:
        return storage.join(self.out, name)

    @property
    def manifests(self) -> str:
        return self._at("manifests")

    @property
    def embed_manifest(self) -> str:
        return storage.join(self.manifests, "embed_manifest.csv")

    @property
    def store(self) -> str:
        """Feature store: ``store/features/<slide_id>.parquet`` + ``store/slides.parquet``."""
        return self._at("store")

    @property
    def run(self) -> str:
        return self._at("run")

    @property
    def predictions(self) -> str:
        return self._at("predictions")

    @property
    def evaluation(self) -> str:
        return self._at("evaluation")

    @property
    def heatmaps(self) -> str:
        return self._at("heatmaps")


# --------------------------------------------------------------------------------------------------
# Loading and validating the YAML
# --------------------------------------------------------------------------------------------------

def _expand(path: str | None) -> str | None:
    """``~`` and ``${VAR}`` in local paths (so one example YAML works on any laptop); URLs untouched."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(os.path.expandvars(path)))


def load_pipeline_config(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read and validate a run YAML; every error names the file and the offending key."""
    path = str(path)
    data = load_yaml(path)
    cfg = PipelineConfig.from_mapping(data, source=path)
    cfg = cfg.model_copy(update={"manifest": _expand(cfg.manifest), "out": _expand(cfg.out),
                                 "test_manifest": _expand(cfg.test_manifest)})
    missing_test = sorted(TEST_STAGES.intersection(cfg.stages)) if cfg.test_manifest is None else []
    if missing_test:
        raise ConfigError(f"{path}: test_manifest: required by stage(s) {', '.join(missing_test)}")
    for stage in cfg.stages:  # fail before any work starts, not after an hour of embedding
        stage_argv(stage, cfg, source=path)
    return cfg


# --------------------------------------------------------------------------------------------------
# Stage option <-> CLI translation
# --------------------------------------------------------------------------------------------------

def stage_parser(stage: str, *, source: str = "config") -> argparse.ArgumentParser:
    """The real ``her2ray <stage>`` argparse parser (so the YAML schema is the CLI's)."""
    from her2ray import cli

    if stage not in getattr(cli, "STAGES", ()):
        raise ConfigError(f"{source}: stages: 'her2ray {stage}' is not available in this her2ray "
                          f"(her2ray.cli.STAGES = {list(getattr(cli, 'STAGES', ()))})")
    # Build just this stage's subparser (as her2ray.cli.build_parser does for all of them), so one
    # stage's options can be checked without importing every other stage.
    import importlib

    sub = argparse.ArgumentParser(prog="her2ray").add_subparsers(dest="command")
    importlib.import_module(f"her2ray.cli.{stage}").add_parser(sub)
    return sub.choices[stage]


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions
            if a.dest not in (argparse.SUPPRESS, "help", "func") and not isinstance(a, argparse._HelpAction)}


# Inputs/outputs a pipeline wires itself. Each role lists the option names (argparse dests) a stage may
# use for it, most likely first; the first one the stage's parser has is used.
WIRING: dict[str, dict[str, tuple[str, ...]]] = {
    "embed": {"manifest": ("manifest",), "out": ("out", "store", "output")},
    "train": {"manifest": ("manifest", "labels"), "features": ("features", "store", "feature_store"),
              "out": ("out", "run", "output")},
    "score": {"manifest": ("manifest",), "features": ("features", "store", "feature_store"),
              "run": ("run", "model", "models"), "out": ("out", "output")},
    "evaluate": {"predictions": ("predictions", "preds"), "manifest": ("manifest", "labels"),
                 "out": ("out", "output")},
    "heatmap": {"scores": ("scores",), "manifest": ("slides", "manifest"),
                "features": ("features", "store", "feature_store"), "out": ("out", "output")},
}
#: Roles a stage can live without (heatmaps may read attention from predictions or recompute it from run).
OPTIONAL_ROLES: dict[str, frozenset[str]] = {
    "heatmap": frozenset({"features"}),
    "evaluate": frozenset({"manifest"}),
}
ADDRESS_DESTS: tuple[str, ...] = ("address", "ray_address")


def _role_values(stage: str, cfg: PipelineConfig, layout: Layout) -> dict[str, str]:
    predictions = storage.join(layout.predictions, "predictions.parquet")
    values = {
        "embed": {"manifest": layout.embed_manifest if cfg.test_manifest else cfg.manifest,
                  "out": layout.store},
        "train": {"manifest": cfg.manifest, "features": layout.store, "out": layout.run},
        "score": {"manifest": cfg.test_manifest, "features": layout.store, "run": layout.run,
                  "out": layout.predictions},
        "evaluate": {"predictions": predictions, "manifest": cfg.test_manifest, "out": layout.evaluation},
        "heatmap": {"scores": layout.predictions, "features": layout.store, "manifest": cfg.test_manifest,
                    "out": layout.heatmaps},
    }[stage]
    return {role: v for role, v in values.items() if v is not None}


def resolve_wiring(stage: str, parser: argparse.ArgumentParser, *, source: str) -> dict[str, str]:
    """role -> dest for this stage's parser; a missing required role is a (developer-facing) error."""
    dests = _actions_by_dest(parser)
    found: dict[str, str] = {}
    for role, candidates in WIRING[stage].items():
        dest = next((d for d in candidates if d in dests), None)
        if dest is not None:
            found[role] = dest
        elif role not in OPTIONAL_ROLES.get(stage, frozenset()):
            raise ConfigError(f"{source}: 'her2ray {stage}' has no option for its {role} "
                              f"(looked for {', '.join('--' + c.replace('_', '-') for c in candidates)})")
    return found


def _emit(action: argparse.Action, value: Any, *, where: str) -> list[str]:
    """argv tokens for one option value, type- and choice-checked with the parser's own rules."""
    flag = next((s for s in action.option_strings if s.startswith("--")),
                action.option_strings[0] if action.option_strings else None)
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return [flag] if value else [f"--no-{flag[2:]}"]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return [flag] if value != action.default else []
    if isinstance(action, argparse._StoreConstAction):
        raise ConfigError(f"{where}: option takes no value; not settable from YAML")
    if value is None:
        return []
    multi = action.nargs not in (None, "?") or isinstance(action, argparse._AppendAction)
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) > 1 and not multi:
        raise ConfigError(f"{where}: expected a single value, got a list")
    tokens = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise ConfigError(f"{where}: expected a scalar, got {type(item).__name__}")
        text = ("true" if item else "false") if isinstance(item, bool) and action.type is not None else str(item)
        converted = text
        if callable(action.type):
            try:
                converted = action.type(text)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"{where}: invalid value {item!r}: {exc}") from None
        if action.choices is not None and converted not in action.choices:
            raise ConfigError(f"{where}: invalid value {item!r} (choose from "
                              f"{', '.join(map(str, action.choices))})")
        tokens.append(text)
    if not flag:  # positional
        return tokens
    if isinstance(action, argparse._AppendAction):
        return [t for tok in tokens for t in (flag, tok)]
    return [flag, *tokens]


def stage_argv(stage: str, cfg: PipelineConfig, *, source: str = "config",
               address: str | None = None) -> list[str]:
    """Full ``her2ray`` argv for one stage: wired paths + validated user options (+ Ray address)."""
    parser = stage_parser(stage, source=source)
    dests = _actions_by_dest(parser)
    wiring = resolve_wiring(stage, parser, source=source)
    layout = Layout(cfg.out)
    values = _role_values(stage, cfg, layout)
    reserved = {dest: role for role, dest in wiring.items()}
    reserved.update({d: "ray.address" for d in ADDRESS_DESTS if d in dests})

    positional: list[str] = []
    options: list[str] = []

    def put(action: argparse.Action, value: Any, where: str) -> None:
        (options if action.option_strings else positional).extend(_emit(action, value, where=where))

    for role, dest in wiring.items():
        if role in values:
            put(dests[dest], values[role], f"{source}: {stage} <{role}>")
    if address:
        for dest in ADDRESS_DESTS:
            if dest in dests:
                put(dests[dest], address, f"{source}: ray.address")
                break
    user_keys = {str(k).replace("-", "_") for k in getattr(cfg, stage)}
    if stage == "score" and "heatmap" in cfg.stages and "attention" in dests and "attention" not in user_keys:
        put(dests["attention"], True, f"{source}: score.attention")  # heatmaps draw score's attention
    for key, value in getattr(cfg, stage).items():
        dest = str(key).replace("-", "_")
        where = f"{source}: {stage}.{key}"
        if dest not in dests:
            known = ", ".join(sorted(d for d in dests if d not in reserved))
            raise ConfigError(f"{where}: unknown key for 'her2ray {stage}' (known: {known})")
        if dest in reserved:
            raise ConfigError(f"{where}: set by the pipeline from '{reserved[dest]}'"
                              f"{'' if reserved[dest] == 'ray.address' else ' (derived from out)'}; remove it")
        put(dests[dest], value, where)
    return [stage, *positional, *options]


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------

def write_embed_manifest(cfg: PipelineConfig) -> str:
    """Union of manifest + test_manifest, so one ``embed`` pass covers train and held-out slides."""
    from her2ray.manifest import read_table
    import pandas as pd

    layout = Layout(cfg.out)
    frames = [read_table(cfg.manifest).to_pandas(), read_table(cfg.test_manifest).to_pandas()]
    union = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["slide_id"], keep="first")
    storage.makedirs(layout.manifests)
    storage.write_text_atomic(layout.embed_manifest, union.to_csv(index=False))
    return layout.embed_manifest


def child_env(address: str | None) -> dict[str, str]:
    """Environment of a stage process: importable her2ray, Ray address, quiet progress bars."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        env["RAY_ADDRESS"] = address
    return env


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {s % 60:04.1f} s"


def run_stage(argv: Sequence[str], *, address: str | None, index: int = 1, total: int = 1,
              log: Callable[[str], None] = print, started_at: float | None = None) -> float:
    """Run ``her2ray <argv>`` in its own process with a start/end banner; returns seconds taken.

    Raises ``StageFailed`` on a non-zero exit, so a pipeline stops at the first broken stage.
    """
    stage = argv[0]
    log(f"\n=== [{index}/{total}] {stage} === her2ray {' '.join(shlex.quote(a) for a in argv)}")
    start = time.perf_counter()
    code = "import sys; from her2ray.cli import main; sys.exit(main(sys.argv[1:]))"
    sys.stdout.flush()
    sys.stderr.flush()
    from her2ray import console

    # Under a quiet console the child gets the terminal (its own her2ray lines) and appends Ray's to our log.
    rc = subprocess.call([sys.executable, "-c", code, *argv], env=console.child_env(child_env(address)),
                         **console.child_stdio())
    seconds = time.perf_counter() - start
    if rc != 0:
        log(f"=== [{index}/{total}] {stage} FAILED (exit {rc}) after {_fmt_seconds(seconds)} ===")
        raise StageFailed(stage, rc)
    overall = "" if started_at is None else f" (total {_fmt_seconds(time.perf_counter() - started_at)})"
    log(f"=== [{index}/{total}] {stage} done in {_fmt_seconds(seconds)}{overall} ===")
    return seconds


class StageFailed(RuntimeError):
    def __init__(self, stage: str, rc: int):
        self.stage, self.rc = stage, rc
        super().__init__(f"stage {stage} exited with status {rc}")


@contextlib.contextmanager
def ray_address(options: RayOptions, *, log: Callable[[str], None] = print) -> Iterator[str]:
    """The address stages connect to; starts (and always stops) a local Ray when none is given.

    Inside ``ray job submit`` RAY_ADDRESS is already set, so jobs attach to the cluster they were
    submitted to; on a laptop ``python -m jobs.pipeline`` gets a private Ray that ends with the run.
    """
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address:
        log(f"Ray: connecting stages to {address}")
        yield address
        return
    import ray

    if ray.is_initialized():   # this process already holds a Ray (e.g. a test session's): stages join it
        address = ray.get_runtime_context().gcs_address
        log(f"Ray: connecting stages to this process's Ray at {address}")
        yield address
        return
    os.environ["PYTHONPATH"] = child_env(None)["PYTHONPATH"]  # raylet-spawned workers import her2ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # private, loopback-only cluster (see cluster/README)
    from her2ray import console
    from her2ray.ray_runtime import route_worker_output

    # address="local": a private Ray even when another one (`ray start`) runs on this machine
    quiet = console.ray_log_stream() is not None
    ctx = ray.init(address="local", num_cpus=options.num_cpus, include_dashboard=False, log_to_driver=quiet,
                   namespace="her2ray-local")
    if quiet:
        route_worker_output(console.ray_log_stream())
    address = ctx.address_info["gcs_address"]
    log(f"Ray: started a local Ray for this run at {address} "
        f"({int(ray.cluster_resources().get('CPU', 0))} CPUs)")
    try:
        yield address
    finally:
        ray.shutdown()


def run_pipeline(cfg: PipelineConfig, stages: Sequence[str] | None = None, *, source: str = "config",
                 log: Callable[[str], None] = print, first_index: int = 1,
                 total: int | None = None, started_at: float | None = None) -> dict[str, float]:
    """Run ``stages`` (default: the config's) in pipeline order; returns seconds per stage.

    ``first_index``/``total`` only number the banners and ``started_at`` (a ``time.perf_counter()``)
    adds the running total to them (the demo runs steps of its own around these).
    """
    started_at = time.perf_counter() if started_at is None else started_at
    wanted = [s for s in ALL_STAGES if s in (stages or cfg.stages)]
    total = total or first_index - 1 + len(wanted)
    timings: dict[str, float] = {}
    with ray_address(cfg.ray, log=log) as address:
        for i, stage in enumerate(wanted, first_index):
            if stage == "embed" and cfg.test_manifest:
                write_embed_manifest(cfg)
            argv = stage_argv(stage, cfg, source=source, address=address)
            timings[stage] = run_stage(argv, address=address, index=i, total=total, log=log,
                                       started_at=started_at)
    return timings


def _run_quietly(cfg: PipelineConfig, stages: Sequence[str], source: str, verbose: bool) -> dict[str, float]:
    """``run_pipeline`` with Ray's output in ``<out>/logs/pipeline-ray.log`` (local ``out``), unless verbose."""
    from her2ray import console

    console.set_verbose(verbose)
    if verbose or console.is_verbose() or not storage.is_local(cfg.out):
        return run_pipeline(cfg, stages, source=source)
    log_path = os.path.join(storage.local_path(cfg.out), "logs", "pipeline-ray.log")
    with console.QuietConsole(log_path):
        return run_pipeline(cfg, stages, source=source)


def job_main(stage: str | None, argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.<stage> --config X.yaml`` (``stage=None``: the whole pipeline)."""
    name = f"jobs.{stage or 'pipeline'}"
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=(
        f"Run {'the her2ray pipeline' if stage is None else 'her2ray ' + stage} from a validated YAML."))
    parser.add_argument("--config", required=True, help="run YAML (local path or s3:// URL)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print the her2ray command lines without running them")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Ray's output live on the console (default: OUT/logs/pipeline-ray.log)")
    args = parser.parse_args(argv)
    try:
        cfg = load_pipeline_config(args.config)
        stages = [stage] if stage else list(cfg.stages)
        if args.dry_run:
            for s in [s for s in ALL_STAGES if s in stages]:
                print("her2ray " + " ".join(shlex.quote(a) for a in stage_argv(s, cfg, source=args.config)))
            return 0
        total_start = time.perf_counter()
        timings = _run_quietly(cfg, stages, args.config, verbose=args.verbose)
    except ConfigError as exc:
        print(f"{name}: config error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return exc.rc if exc.rc > 0 else 1
    summary = ", ".join(f"{s} {_fmt_seconds(t)}" for s, t in timings.items())
    print(f"\n{name}: finished in {_fmt_seconds(time.perf_counter() - total_start)} ({summary}); "
          f"outputs under {cfg.out}")
    return 0
