"""Validated configuration of ``her2ray cohort merge``: one entry per center, unknown keys are errors.

Example (YAML)::

    centers:
      - name: siteA
        manifest: s3://bucket/siteA/manifest.csv
        columns: {Slide: slide_id, File: path, HER2: her2_score, Patient: patient_id}
        label_map: {"weak": "1+", "neg": "0"}       # only for spellings parse_her2_score rejects
        ish: {column: FISH, positive: [amplified], negative: [not amplified]}
        slide_id_prefix: "A_"                        # or prefix_slide_ids: true below
    prefix_slide_ids: false
    features: s3://bucket/features                   # optional: tiles per slide in the summary
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..config import StageConfig

#: Columns of the unified manifest that a center's column mapping may target.
KNOWN_TARGETS = ("slide_id", "path", "her2_score", "patient_id", "ish", "mpp", "scanner")
CENTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


class IshConfig(StageConfig):
    """Where the ISH (FISH/SISH/CISH) result is, and which values mean 'amplified'.

    Values compare case-insensitively after stripping. With ``negative`` given, any other non-empty
    value is an error (catches typos); without it, every non-positive value counts as not amplified.
    """

    column: str
    positive: list[str] = Field(default_factory=lambda: ["amplified", "positive", "pos", "yes", "1", "true"])
    negative: list[str] | None = None
    #: Numeric columns (HER2/CEP17 ratio): amplified when value >= this (ASCO/CAP 2018: 2.0); text values
    #: still go through ``positive``/``negative``.
    ratio_threshold: float | None = Field(default=None, gt=0)

    @field_validator("positive", "negative")
    @classmethod
    def _norm(cls, v):
        return None if v is None else [str(x).strip().lower() for x in v]


class CenterConfig(StageConfig):
    """One submitting center: its manifest, how its columns map to ours, and its label quirks."""

    name: str
    manifest: str
    columns: dict[str, str] = Field(default_factory=dict)   # source column -> unified column
    label_map: dict[str, str | int] = Field(default_factory=dict)
    ish: IshConfig | None = None
    slide_id_prefix: str | None = None
    path_base: str | None = None   # relative slide paths resolve here (default: the manifest's folder)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not CENTER_NAME.match(v):
            raise ValueError(f"center name {v!r}: use letters, digits, '.', '_', '-'")
        return v

    @field_validator("label_map")
    @classmethod
    def _labels(cls, v):
        from ..labels import parse_her2_score

        out = {}
        for raw, score in v.items():
            try:
                parse_her2_score(score)
            except ValueError as exc:
                raise ValueError(f"label_map[{raw!r}]: {exc}") from None
            out[str(raw).strip().lower()] = score
        return out

    @model_validator(mode="after")
    def _targets(self):
        targets = list(self.columns.values())
        dupes = sorted({t for t in targets if targets.count(t) > 1})
        if dupes:
            raise ValueError(f"center {self.name}: several source columns map to {dupes}")
        if "center" in targets:
            raise ValueError(f"center {self.name}: 'center' is set by the merge, do not map a column to it")
        return self


class MergeConfig(StageConfig):
    """The whole merge: centers in priority order (on exact duplicates the first center's row is kept)."""

    centers: list[CenterConfig] = Field(min_length=1)
    prefix_slide_ids: bool = False        # prefix every id with "<center>_" unless the center sets its own
    require_labels: bool = True           # False: unlabeled centers allowed (external inference cohorts)
    check_files: bool = True              # stat every slide file (size/ETag): missing files, duplicates
    missing_files: Literal["error", "warn", "drop"] = "error"
    hash_mode: Literal["auto", "full", "none"] = "auto"   # see her2ray.cohorts.duplicates
    keep_extra_columns: bool = True       # carry unmapped source columns into the unified manifest
    features: str | None = None           # feature store (slides.parquet n_tiles) for the summary
    slide_metadata: bool = True           # open slides for MPP/scanner in the summary
    max_workers: int = Field(default=16, ge=1, le=256)

    @model_validator(mode="after")
    def _unique_centers(self):
        names = [c.name for c in self.centers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"center names must be unique, repeated: {dupes}")
        return self
