"""Metrics, confidence intervals, calibration, figures and markdown reports.

Training, ``her2ray evaluate`` and multi-center work all report through this package so their numbers and
keys are the same. Figures (:mod:`.plots`) and the evaluate engine (:mod:`.evaluate`) import matplotlib and
are imported from their submodules, not here, to keep ``import her2ray.reports`` light.
"""

from .bootstrap import DEFAULT_METRIC_KEYS, bootstrap_ci, bootstrap_indices
from .calibration import calibration_summary, expected_calibration_error, reliability_bins
from .metrics import (DEFAULT_THRESHOLDS, ENDPOINTS, SCALAR_KEYS, classification_metrics, endpoint_scores,
                      operating_points, summarize_folds)

__all__ = [
    "DEFAULT_METRIC_KEYS", "DEFAULT_THRESHOLDS", "ENDPOINTS", "SCALAR_KEYS", "bootstrap_ci", "bootstrap_indices",
    "calibration_summary", "classification_metrics", "endpoint_scores", "expected_calibration_error",
    "operating_points", "reliability_bins", "summarize_folds",
]
