"""Cross-validated training of slide-level HER2 models (KAT, ABMIL) on Ray Train.

Layers: ``splits`` (science: who is in which fold), ``loop`` (engine: one fold, no Ray), ``folds`` (Ray
Train: one TorchTrainer per fold, concurrent, resumable), ``run`` (orchestration: inputs, outputs).
The scoring stage only needs :func:`load_fold_models` / :func:`load_best_model`.
"""

from .checkpoints import load_best_model, load_fold_models
from .config import TrainConfig

__all__ = ["TrainConfig", "load_best_model", "load_fold_models"]
