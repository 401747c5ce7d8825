"""HER2 IHC scores: one parser for every spelling, and the column names used everywhere in her2ray.

Internal classes are integers 0..3 meaning IHC ``0``, ``1+``, ``2+``, ``3+``. HER2-low is 1+ or 2+.
"""

from __future__ import annotations

import math
import re
from typing import Any

HER2_SCORES: tuple[str, ...] = ("0", "1+", "2+", "3+")
NUM_CLASSES = len(HER2_SCORES)
PROB_COLUMNS: tuple[str, ...] = ("prob_her2_0", "prob_her2_1plus", "prob_her2_2plus", "prob_her2_3plus")
#: The same probabilities before post-hoc calibration (``prob_her2_*`` are calibrated when the run has a map).
UNCAL_PROB_COLUMNS: tuple[str, ...] = tuple(c.replace("prob_her2_", "prob_uncal_her2_") for c in PROB_COLUMNS)

_PATTERN = re.compile(
    r"^\s*(?:(?:her-?2|erbb2)\s*[:=]?\s*)?(?:ihc\s*[:=]?\s*)?(?:score\s*[:=]?\s*)?([0-3])(?:\.0+)?\s*(\+{1,3})?\s*$",
    re.IGNORECASE,
)


def parse_her2_score(value: Any) -> int:
    """Class index 0..3 for a HER2 IHC score in any common spelling.

    Accepts integers 0..3, floats like 2.0, and strings such as ``0``, ``1+``, ``2+``, ``3+``, ``HER2 1+``,
    ``IHC 2+``, ``score 3``, ``+++`` is not accepted (ambiguous). Raises ``ValueError`` otherwise.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a HER2 IHC score: {value!r}")
    if isinstance(value, (int,)) or (hasattr(value, "dtype") and getattr(value, "dtype").kind in "iu"):
        ivalue = int(value)
        if 0 <= ivalue <= 3:
            return ivalue
        raise ValueError(f"HER2 IHC score must be 0..3, got {value!r}")
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and 0 <= int(value) <= 3:
            return int(value)
        raise ValueError(f"not a HER2 IHC score: {value!r}")
    match = _PATTERN.match(str(value))
    if not match:
        raise ValueError(f"not a HER2 IHC score: {value!r} (expected 0, 1+, 2+ or 3+)")
    digit, plus = int(match.group(1)), match.group(2)
    if plus and (digit == 0 or len(plus) != 1):
        raise ValueError(f"not a HER2 IHC score: {value!r}")
    return digit


def score_name(index: int) -> str:
    """``0`` -> ``"0"``, ``1`` -> ``"1+"`` ..."""
    return HER2_SCORES[int(index)]


def is_her2_low(index: int) -> bool:
    """HER2-low means IHC 1+ or 2+."""
    return int(index) in (1, 2)
