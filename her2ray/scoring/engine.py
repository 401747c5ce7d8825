"""Score slides with a trained fold ensemble, one slide at a time, without Ray.

This is the unit of work the Ray Data actors run (``scoring.pipeline``) and what a notebook or a test calls
directly. Per slide: read its feature file, build the KAT kernels exactly as training did (``build_kernels``
with the checkpoint's ``npk``/``max_nodes`` and the file's ``tile_size_level0_px``), run every fold in eval
mode, calibrate each fold's softmax with the run's ``calibration.json`` and average over folds (the raw
average is kept as ``prob_uncal_her2_*``), and flag the run's screening operating points
(``operating_points.json``; one boolean ``screen_*`` column each).
With ``attention`` the per-tile attention is computed in the
same forward pass and written next to the predictions, so heatmaps never need the model again.

A slide that cannot be scored yields a row with ``status="failed"`` and the reason: one bad file must not
stop a 10,000-slide cohort.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from .. import storage
from ..errors import ConfigError, FeatureStoreError
from ..features.schema import SlideFeatures, read_slide_features
from ..labels import HER2_SCORES, NUM_CLASSES, PROB_COLUMNS, UNCAL_PROB_COLUMNS, is_her2_low, score_name
from ..training.calibration import IDENTITY, Calibration, load_calibration
from ..training.operating_points import apply_operating_points, load_operating_points
from .checkpoints import (FoldCheckpoint, build_module, ensemble_sha256, find_fold_checkpoints,
                          load_checkpoint, run_id_of)

log = logging.getLogger(__name__)

STD_COLUMNS: tuple[str, ...] = tuple(c.replace("prob_", "fold_std_") for c in PROB_COLUMNS)
ATTENTION_DIR = "attention"
ATTENTION_META_KEY = b"her2ray_attention"

# One scored slide = one row with exactly these columns (same types on success and failure, so Ray Data
# batches of any mix concatenate). Carried manifest columns are added by the pipeline.
RESULT_SCHEMA = pa.schema(
    [("slide_id", pa.string()), ("status", pa.string()), ("error", pa.string())]
    + [(c, pa.float64()) for c in PROB_COLUMNS]
    + [(c, pa.float64()) for c in UNCAL_PROB_COLUMNS]
    + [("pred_score", pa.string()), ("pred_index", pa.int64()), ("her2_low", pa.bool_()),
       ("fold_std", pa.float64())]
    + [(c, pa.float64()) for c in STD_COLUMNS]
    + [("n_tiles", pa.int64()), ("n_tiles_used", pa.int64()), ("n_folds", pa.int64()),
       ("model_run_id", pa.string()), ("model_sha256", pa.string()), ("attention_url", pa.string()),
       ("seconds", pa.float64())]
)


def result_schema(flag_columns: Iterable[str] = ()) -> pa.Schema:
    """``RESULT_SCHEMA`` plus one boolean column per screening operating point of the model run."""
    schema = RESULT_SCHEMA
    for c in flag_columns:
        schema = schema.append(pa.field(c, pa.bool_()))
    return schema


@dataclass
class Bag:
    """One slide ready for the model: batch of one, no padding (padding is exactly inert in KAT anyway)."""

    features: Any            # torch [1, n_kept, P]
    anchor_dist: Any         # torch [1, m, n_kept]
    tile_mask: Any           # torch bool [1, n_kept]
    kernel_mask: Any         # torch bool [1, m]
    kept: np.ndarray         # [n_kept] indices into the slide's feature rows

    def as_batch(self) -> dict[str, Any]:
        return {"features": self.features, "anchor_dist": self.anchor_dist, "tile_mask": self.tile_mask,
                "kernel_mask": self.kernel_mask}


@dataclass
class EnsembleOutput:
    fold_probs: np.ndarray          # [F, C] softmax per fold
    probs: np.ndarray               # [C] mean over folds
    attention: np.ndarray | None    # [n_kept] mean over folds of per-tile attention


class FoldEnsemble:
    """All folds of one training run, loaded once (an actor holds one for its whole life)."""

    def __init__(self, checkpoints: list[FoldCheckpoint], *, run_url: str = "", run_id: str = "",
                 device: str = "cpu", calibration: Calibration = IDENTITY,
                 operating_points: list[dict[str, Any]] | None = None):
        if not checkpoints:
            raise ConfigError(f"{run_url}: empty fold ensemble")
        self.checkpoints = sorted(checkpoints, key=lambda c: c.fold)
        first = self.checkpoints[0]
        for c in self.checkpoints[1:]:
            # Folds trained on other bag settings or features would need other kernels / inputs: refuse.
            for attr in ("patch_dim", "num_classes", "npk", "max_nodes"):
                if getattr(c, attr) != getattr(first, attr):
                    raise ConfigError(f"{run_url}: folds disagree on {attr} "
                                      f"({getattr(first, attr)} vs {getattr(c, attr)} in {c.url})")
        if first.num_classes != NUM_CLASSES:
            raise ConfigError(f"{run_url}: model has {first.num_classes} classes, HER2 scoring needs {NUM_CLASSES}")
        self.run_url, self.run_id, self.device = str(run_url), run_id, device
        self.patch_dim, self.npk, self.max_nodes = first.patch_dim, first.npk, first.max_nodes
        self.model_name = first.model_name
        self.encoder = first.encoder
        self.models = [build_module(c, device) for c in self.checkpoints]
        for c in self.checkpoints:   # weights now live in the modules; drop the second copy
            c.state_dict = {}
        self.sha256 = ensemble_sha256([c.sha256 for c in self.checkpoints])
        self.calibration, self.operating_points = calibration, list(operating_points or [])
        self.flag_columns = [op["column"] for op in self.operating_points]
        self.schema = result_schema(self.flag_columns)

    @classmethod
    def from_run(cls, run_url: str, device: str | None = None,
                 expected_sha256: str | None = None) -> "FoldEnsemble":
        """Load every ``RUN/folds/<k>/best.pt``. ``expected_sha256`` guards against a run changing mid-cohort."""
        device = device or default_device()
        refs = find_fold_checkpoints(run_url)
        ens = cls([load_checkpoint(r) for r in refs], run_url=run_url, run_id=run_id_of(run_url), device=device,
                  calibration=load_calibration(run_url), operating_points=load_operating_points(run_url))
        if expected_sha256 and ens.sha256 != expected_sha256:
            raise ConfigError(f"{run_url}: checkpoints changed since scoring started "
                              f"(sha256 {ens.sha256[:12]} != expected {expected_sha256[:12]})")
        return ens

    @property
    def identity(self) -> dict[str, Any]:
        return {"run_url": self.run_url, "run_id": self.run_id, "sha256": self.sha256,
                "model_name": self.model_name, "npk": self.npk, "max_nodes": self.max_nodes,
                "patch_dim": self.patch_dim, "calibration": self.calibration.method,
                "operating_points": self.flag_columns,
                "folds": [{"fold": c.fold, "url": c.url, "sha256": c.sha256} for c in self.checkpoints]}

    # ------------------------------------------------------------------------------------------------
    def check_features(self, sf: SlideFeatures) -> None:
        """Refuse features the models were not trained on (another dimension or another encoder)."""
        if sf.features.ndim != 2 or sf.features.shape[1] != self.patch_dim:
            raise FeatureStoreError(f"{sf.slide_id}: feature dim {sf.features.shape[-1]} != model patch_dim "
                                    f"{self.patch_dim}")
        if len(sf.features) == 0:
            raise FeatureStoreError(f"{sf.slide_id}: feature file has no tiles")
        want = (self.encoder or {}).get("weights_sha256")
        have = (sf.meta.encoder or {}).get("weights_sha256")
        if want and have and want != have:
            raise FeatureStoreError(
                f"{sf.slide_id}: features made with encoder {sf.meta.encoder.get('name')} "
                f"(weights {have[:12]}) but the model was trained on {self.encoder.get('name')} "
                f"(weights {want[:12]})")

    def prepare(self, sf: SlideFeatures) -> Bag:
        """Kernels exactly as in training: ``build_kernels(coords, tile_size_level0_px, npk, max_nodes)``;
        for graph models (SlideGraph+) the slide graph with the checkpoint's graph settings."""
        import torch

        from ..models import GRAPH_MODELS
        from ..models.kernels import build_kernels

        self.check_features(sf)
        if self.model_name in GRAPH_MODELS:
            from ..models.slidegraph_data import GraphBag, graph_params
            from ..models.slidegraph_graph import build_graph

            params = graph_params(self.checkpoints[0].hparams.get("graph"))
            return GraphBag(build_graph(sf.coords, sf.features, float(sf.meta.tile_size_level0_px), params),
                            self.device)  # type: ignore[return-value]
        plan = build_kernels(sf.coords, float(sf.meta.tile_size_level0_px), self.npk, max_nodes=self.max_nodes)
        kept = np.asarray(plan.kept, dtype=np.int64)
        feats = torch.as_tensor(np.ascontiguousarray(sf.features[kept]), dtype=torch.float32)
        dist = torch.as_tensor(np.asarray(plan.anchor_dist), dtype=torch.float32)
        n, m = feats.shape[0], dist.shape[0]
        dev = self.device
        return Bag(features=feats.unsqueeze(0).to(dev), anchor_dist=dist.unsqueeze(0).to(dev),
                   tile_mask=torch.ones(1, n, dtype=torch.bool, device=dev),
                   kernel_mask=torch.ones(1, m, dtype=torch.bool, device=dev), kept=kept)

    def predict(self, bag: Bag, attention: bool = False) -> EnsembleOutput:
        """Mean of the folds' softmax; per-tile attention (mean over folds) from the same forward pass."""
        import torch

        from ..models import forward_batch

        probs, atts = [], []
        with torch.inference_mode():
            for model in self.models:
                out = forward_batch(model, bag.as_batch(), return_attention=attention)
                logits = out[0] if attention else out
                if attention and hasattr(bag, "tile_scores"):   # graph models: node scores -> tiles
                    atts.append(bag.tile_scores(logits, out[1]))
                elif attention:
                    atts.append(tile_scores_from_attention(model, out[1], bag.tile_mask)[0].cpu().numpy())
                probs.append(torch.softmax(logits.float(), dim=-1)[0].cpu().numpy())
        fold_probs = np.stack(probs).astype(np.float64)
        att_mean = np.mean(np.stack(atts).astype(np.float64), axis=0) if attention else None
        return EnsembleOutput(fold_probs=fold_probs, probs=fold_probs.mean(axis=0), attention=att_mean)


def tile_scores_from_attention(model, attn: dict[str, Any], tile_mask) -> Any:
    """Per-tile relevance [B, n] from the attention a forward(return_attention=True) returned.

    Same definition as ``her2ray.models.kat.tile_attention_scores`` (kat.md section 7): head-mean last-block
    cls->kernel weights projected through the head-mean kernel->patch weights of block ``depth-2``. Computing
    it from the scoring pass saves a second forward per fold; a test pins it to ``tile_attention_scores``.
    ABMIL returns its pooling weights directly (``attn["tile"]``).
    """
    import torch

    if "tile" in attn:
        scores = attn["tile"].float()
    else:
        depth = len(attn["cls_to_kernel"])
        last, proj = depth - 1, max(depth - 2, 0)
        alpha = attn["cls_to_kernel"][last].float().mean(dim=1)          # [B, m]
        w_kp = attn["kernel_to_patch"][proj].float().mean(dim=1)         # [B, m, n]
        scores = torch.einsum("bm,bmn->bn", alpha, w_kp)
    return scores.masked_fill(~tile_mask.to(device=scores.device, dtype=torch.bool), 0.0)


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


# ------------------------------------------------------------------------------------------------------
# Per-slide rows

def empty_row(slide_id: str, flag_columns: Iterable[str] = ()) -> dict[str, Any]:
    row = {f.name: None for f in result_schema(flag_columns)}
    row.update(slide_id=str(slide_id), status="failed", error="")
    for c in PROB_COLUMNS + UNCAL_PROB_COLUMNS + STD_COLUMNS + ("fold_std", "seconds"):
        row[c] = float("nan")
    for c in ("n_tiles", "n_tiles_used", "n_folds", "pred_index"):
        row[c] = -1
    row.update(pred_score="", her2_low=False, model_run_id="", model_sha256="", attention_url="")
    return row


def prediction_fields(fold_probs: np.ndarray, calibration: Calibration = IDENTITY,
                      operating_points: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Probabilities, predicted score, HER2-low flag, screening flags and fold disagreement from the folds'
    softmax [F, C].

    ``prob_her2_*`` = mean over folds of the calibrated fold probabilities, ``prob_uncal_her2_*`` = mean of the
    raw ones; ``pred_score``/``her2_low`` and the ``screen_*`` flags use the calibrated ones. ``fold_std`` is the
    (population) std over folds of the predicted class's raw probability: a cheap flag for slides the folds
    disagree on. Per-class stds are kept too.
    """
    raw = fold_probs.mean(axis=0)
    probs = calibration.apply_ensemble(fold_probs)
    std = fold_probs.std(axis=0)
    pred = int(np.argmax(probs))
    out: dict[str, Any] = {c: float(p) for c, p in zip(PROB_COLUMNS, probs)}
    out.update({c: float(p) for c, p in zip(UNCAL_PROB_COLUMNS, raw)})
    out.update({c: bool(v[0]) for c, v in apply_operating_points(operating_points or [], probs[None, :]).items()})
    out.update({c: float(s) for c, s in zip(STD_COLUMNS, std)})
    out.update(pred_index=pred, pred_score=score_name(pred), her2_low=bool(is_her2_low(pred)),
               fold_std=float(std[pred]), n_folds=int(fold_probs.shape[0]))
    return out


def attention_url(out_dir: str, slide_id: str) -> str:
    return storage.join(out_dir, ATTENTION_DIR, f"{slide_id}.parquet")


def spread_to_all_tiles(coords: np.ndarray, kept: np.ndarray, kept_scores: np.ndarray) -> np.ndarray:
    """Scores for every tile: kept tiles keep theirs, tiles dropped by down-sampling take the nearest kept one.

    Training/inference keep a regular sub-grid when a slide has more than ``max_nodes`` tiles; a heatmap with
    holes in a checkerboard would be misleading, the nearest kept tile is the honest local estimate.
    """
    n = len(coords)
    scores = np.empty(n, dtype=np.float64)
    if len(kept) == n:
        scores[kept] = kept_scores
        return scores
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(coords[kept].astype(np.float64)).query(coords.astype(np.float64), k=1)
    scores[:] = kept_scores[nearest]
    scores[kept] = kept_scores
    return scores


def attention_table(sf: SlideFeatures, kept: np.ndarray, kept_scores: np.ndarray,
                    identity: dict[str, Any] | None = None) -> pa.Table:
    """``slide_id, x, y, score, kept`` for every tile of the feature file (same rows, same order).

    Schema metadata carries what a heatmap needs without the feature store: tile size in level-0 px.
    """
    scores = spread_to_all_tiles(sf.coords, kept, kept_scores)
    is_kept = np.zeros(len(sf.x), dtype=bool)
    is_kept[kept] = True
    meta = {"slide_id": sf.slide_id, "tile_size_level0_px": float(sf.meta.tile_size_level0_px),
            "slide_mpp": sf.meta.slide_mpp, "score": "mean over folds of tile_attention_scores",
            "model_run_id": (identity or {}).get("run_id"), "model_sha256": (identity or {}).get("sha256"),
            "encoder_random_weights": bool((sf.meta.encoder or {}).get("random_weights"))}
    table = pa.table({
        "slide_id": pa.array([sf.slide_id] * len(sf.x), type=pa.string()),
        "x": pa.array(sf.x, type=pa.int64()),
        "y": pa.array(sf.y, type=pa.int64()),
        "score": pa.array(scores.astype(np.float32), type=pa.float32()),
        "kept": pa.array(is_kept, type=pa.bool_()),
    })
    return table.replace_schema_metadata({ATTENTION_META_KEY: json.dumps(meta).encode()})


def score_features(ensemble: FoldEnsemble, sf: SlideFeatures, attention: bool = False
                   ) -> tuple[dict[str, Any], pa.Table | None]:
    """Prediction fields (no I/O) and, with ``attention``, the slide's attention table."""
    bag = ensemble.prepare(sf)
    out = ensemble.predict(bag, attention=attention)
    fields = prediction_fields(out.fold_probs, ensemble.calibration, ensemble.operating_points)
    fields.update(n_tiles=int(len(sf.x)), n_tiles_used=int(len(bag.kept)),
                  model_run_id=ensemble.run_id, model_sha256=ensemble.sha256)
    table = attention_table(sf, bag.kept, out.attention, ensemble.identity) if attention else None
    return fields, table


def score_slide(ensemble: FoldEnsemble, slide_id: str, feature_url: str, out_dir: str | None = None,
                attention: bool = False) -> dict[str, Any]:
    """Score one slide from its feature file; never raises for a bad slide (status/error say why)."""
    t0 = time.perf_counter()
    row = empty_row(slide_id, ensemble.flag_columns)
    try:
        sf = read_slide_features(feature_url)
        if sf.slide_id != slide_id:
            raise FeatureStoreError(f"{feature_url}: file is for slide {sf.slide_id!r}, not {slide_id!r}")
        fields, table = score_features(ensemble, sf, attention=attention)
        row.update(fields)
        if table is not None:
            if out_dir is None:
                raise ConfigError("attention requested without an output folder")
            url = attention_url(out_dir, slide_id)
            storage.write_parquet_atomic(table, url)
            row["attention_url"] = url
        row.update(status="ok", error="")
    except Exception as exc:  # noqa: BLE001 - per-slide isolation: report, continue with the cohort
        log.warning("slide %s not scored: %s", slide_id, exc)
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    row["seconds"] = time.perf_counter() - t0
    return row


def score_slides(ensemble: FoldEnsemble, items: Iterable[tuple[str, str]], out_dir: str | None = None,
                 attention: bool = False) -> Iterator[dict[str, Any]]:
    """Score ``(slide_id, feature_url)`` pairs one by one (streaming: one slide's features in memory at a time)."""
    for slide_id, url in items:
        yield score_slide(ensemble, slide_id, url, out_dir=out_dir, attention=attention)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema = RESULT_SCHEMA) -> pa.Table:
    """Result rows as an Arrow table with ``schema`` (``RESULT_SCHEMA`` or ``result_schema(flags)``)."""
    return pa.Table.from_pylist(rows, schema=schema)


__all__ = ["ATTENTION_DIR", "Bag", "EnsembleOutput", "FoldEnsemble", "HER2_SCORES", "RESULT_SCHEMA",
           "STD_COLUMNS", "attention_table", "attention_url", "empty_row", "prediction_fields",
           "result_schema", "rows_to_table", "score_features", "score_slide", "score_slides", "spread_to_all_tiles"]
