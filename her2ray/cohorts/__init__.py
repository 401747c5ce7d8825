"""Multi-center cohorts: merge per-center manifests, find duplicates, summarise, test for site bias.

- ``merge_cohorts(MergeConfig)`` -> ``MergeResult`` (unified rows + duplicates/patient-overlap reports)
- ``write_summary(rows, out_dir, features=None)`` -> summary.csv / .md / .png per center
- ``site_bias_auc(features_store, manifest, seed=0, folds=5)`` -> report dict (AUC, warning)
"""

from .config import CenterConfig, IshConfig, MergeConfig
from .merge import MergeResult, merge_cohorts, write_table
from .site_bias import site_bias_auc
from .summary import write_summary

__all__ = ["CenterConfig", "IshConfig", "MergeConfig", "MergeResult", "merge_cohorts", "site_bias_auc",
           "write_summary", "write_table"]
