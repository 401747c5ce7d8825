"""``TrainConfig``: every knob of ``her2ray train`` in one validated object (YAML section ``train`` or flags).

Defaults follow the official KAT recipe (kat.md section 6: Adam lr 1e-4, no weight decay, batch 32,
class-balanced sampling, tile-dropout augmentation with aug_rate 0.5, dropout 0.5, dim 256, depth 4,
heads 8, dim_head 64, mlp_dim 512, npk 144, MAX_NODES 4096). The official code trains a fixed 200 epochs
and picks the epoch by hand; we add early stopping on validation macro AUC (``patience``) so a cohort run
needs no human in the loop, and keep ``max_epochs`` as the ceiling.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import StageConfig

MODEL_NAMES = ("kat", "abmil", "slidegraph")


#: Where and how fast a run executes; never changes its numbers (a resume may change them).
RESOURCE_KEYS = frozenset({"address", "cpus_per_fold", "gpus_per_fold", "max_concurrent_folds", "max_failures"})


class TrainConfig(StageConfig):
    """Cross-validation training settings; unknown keys are rejected (``StageConfig``)."""

    # --- protocol --------------------------------------------------------------------------------
    model: Literal["kat", "abmil", "slidegraph"] = "kat"
    folds: int = Field(5, ge=2, le=50, description="CV folds (ignored with split_by=center: one per center)")
    seed: int = 0
    split_by: Literal["patient", "center"] = "patient"
    train_centers: list[str] | None = None
    test_centers: list[str] | None = None
    balance: Literal["sampler", "loss"] = "sampler"

    # --- optimisation (official recipe) ----------------------------------------------------------
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(20, ge=1, description="epochs without val macro-AUC improvement before stopping")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    aug_rate: float = Field(0.5, ge=0, lt=1, description="max tile-dropout rate (official node augmentation)")
    eval_batch_size: int = Field(8, ge=1)
    cache_features: bool = Field(True, description="keep kept-tile features in RAM across epochs (fast; "
                                                    "~n_tiles*dim*4 bytes per slide per concurrent fold)")

    # --- model hyper-parameters (KAT; ABMIL uses dim and dropout) --------------------------------
    dim: int = Field(256, ge=1)
    depth: int = Field(4, ge=2)  # depth 1 ignores the slide (see KernelAttentionTransformer)
    heads: int = Field(8, ge=1)
    dim_head: int = Field(64, ge=1)
    mlp_dim: int = Field(512, ge=1)
    npk: int = Field(144, ge=1)
    max_nodes: int = Field(4096, ge=16)
    dropout: float = Field(0.5, ge=0, lt=1)
    emb_dropout: float = Field(0.0, ge=0, lt=1)
    abmil_dropout: float = Field(0.25, ge=0, lt=1)

    # --- SlideGraph+ (TIAToolbox HER2 pipeline settings; README "SlideGraph+") -------------------
    sg_layers: list[int] = Field(default_factory=lambda: [16, 16, 8], min_length=1,
                                 description="input embedding width, then one EdgeConv per further width")
    sg_dropout: float = Field(0.5, ge=0, lt=1, description="dropout on each layer's pooled logits")
    sg_pooling: Literal["mean", "max", "add"] = "mean"
    graph_lambda_d: float = Field(3.0e-3, gt=0, description="spatial decay per level-0 px")
    graph_lambda_f: float = Field(1.0e-3, gt=0, description="feature-distance decay")
    graph_lambda_h: float = Field(0.8, gt=0, le=1, description="hierarchical clustering cut")
    graph_connectivity_level0_px: float = Field(4000.0, gt=0, description="longest Delaunay edge kept")
    graph_neighbour_radius_level0_px: float = Field(2000.0, gt=0)
    graph_max_tiles: int = Field(6000, ge=16, description="tiles above this are grid-pooled before clustering")

    # --- reproducibility (see README "Reproducibility") -------------------------------------------
    torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads inside every fold, pinned "
                               "whatever cpus_per_fold or the machine: results are bit-identical for one value")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms(True) (GPU: slower, "
                                "errors on ops without a deterministic kernel); CPU is deterministic anyway")

    # --- post-hoc calibration and screening operating points (fitted on the OOF predictions) -------
    calibration: Literal["auto", "temperature", "vector", "none"] = "auto"
    screening_endpoints: list[str] = Field(default_factory=lambda: ["her2_0_vs_low", "her2_low_vs_positive"])
    screening_sensitivities: list[float] = Field(default_factory=lambda: [0.90, 0.95])

    # --- Ray resources ----------------------------------------------------------------------------
    address: str | None = None
    cpus_per_fold: float = Field(1.0, gt=0)
    gpus_per_fold: float = Field(0.0, ge=0)
    max_concurrent_folds: int = Field(0, ge=0, description="0 = all folds at once")
    max_failures: int = Field(1, ge=0, description="Ray Train restarts per fold (a restart resumes from the "
                                                    "last epoch checkpoint); a rerun of the command resumes too")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if (self.train_centers is None) != (self.test_centers is None):
            raise ValueError("train_centers and test_centers go together (external validation mode)")
        if self.train_centers is not None:
            overlap = set(self.train_centers) & set(self.test_centers or [])
            if overlap:
                raise ValueError(f"centers {sorted(overlap)} are in both train_centers and test_centers")
            if not self.train_centers or not self.test_centers:
                raise ValueError("train_centers and test_centers must not be empty")
        from ..reports.metrics import ENDPOINTS

        unknown = [e for e in self.screening_endpoints if e not in ENDPOINTS]
        if unknown:
            raise ValueError(f"unknown screening endpoint(s) {unknown}; endpoints are {list(ENDPOINTS)}")
        bad = [t for t in self.screening_sensitivities if not 0.0 < t < 1.0]
        if bad:
            raise ValueError(f"screening sensitivities must be in (0, 1), got {bad}")
        if self.gpus_per_fold > 1 and self.gpus_per_fold != int(self.gpus_per_fold):
            raise ValueError("gpus_per_fold above 1 must be a whole number")
        return self

    def protocol_dict(self) -> dict[str, Any]:
        """``to_dict()`` without the resource keys: what ``best.pt`` records (where a run executed is not part
        of the model). The file's bytes still differ between reruns: ``torch.save`` writes a random
        serialization id, so ``model_sha256`` identifies a file, not a set of weights."""
        return {k: v for k, v in self.to_dict().items() if k not in RESOURCE_KEYS}

    def model_hparams(self) -> dict[str, Any]:
        """Keyword arguments for ``build_model(self.model, ...)``."""
        if self.model == "kat":
            return {"dim": self.dim, "depth": self.depth, "heads": self.heads, "dim_head": self.dim_head,
                    "mlp_dim": self.mlp_dim, "npk": self.npk, "dropout": self.dropout,
                    "emb_dropout": self.emb_dropout}
        if self.model == "slidegraph":
            return {"layers": list(self.sg_layers), "dropout": self.sg_dropout, "pooling": self.sg_pooling,
                    "graph": self.graph_settings()}
        return {"dim": self.dim, "dropout": self.abmil_dropout}

    def graph_settings(self) -> dict[str, Any]:
        """``GraphParams`` keyword arguments (SlideGraph+ graph construction)."""
        return {"lambda_d": self.graph_lambda_d, "lambda_f": self.graph_lambda_f, "lambda_h": self.graph_lambda_h,
                "connectivity_level0_px": self.graph_connectivity_level0_px,
                "neighbour_radius_level0_px": self.graph_neighbour_radius_level0_px,
                "max_tiles": self.graph_max_tiles}

    def data_settings(self) -> dict[str, Any]:
        """What ``models.make_dataset`` needs besides urls/labels (bag or graph settings)."""
        return {"npk": self.npk, "max_nodes": self.max_nodes, "cache_features": self.cache_features,
                "graph": self.graph_settings()}
