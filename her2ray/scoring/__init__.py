"""Slide-level HER2 scoring with a trained fold ensemble.

``engine``: score slides one at a time without Ray (``FoldEnsemble``, ``score_slide``).
``pipeline``: the same engine inside Ray Data actors for a whole cohort (``score_cohort``).
``checkpoints``: locate and load ``RUN/folds/<k>/best.pt``.
"""

from .checkpoints import ensemble_identity, find_fold_checkpoints, load_checkpoint
from .engine import FoldEnsemble, score_features, score_slide, score_slides

__all__ = ["FoldEnsemble", "ensemble_identity", "find_fold_checkpoints", "load_checkpoint", "score_features",
           "score_slide", "score_slides"]
