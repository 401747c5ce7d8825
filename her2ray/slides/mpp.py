"""Microns per pixel from slide metadata, with one rule for every backend.

Why a separate module: MPP decides the pyramid level and the physical size of every tile, so a wrong
value silently changes the science. We accept only explicit sources (the vendor-normalised
``openslide.mpp-x/-y``, then TIFF resolution tags with a physical unit) and reject implausible values
(e.g. the 72 dpi default many writers put in, which would read as 352 um/px).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

log = logging.getLogger(__name__)

#: plausible range of microscope scan resolutions, um/px (objectives 1.25x-100x and margins)
MPP_RANGE = (0.01, 50.0)

_UNIT_TO_UM = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "in": 25400.0, "2": 25400.0}


def _positive_float(value) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def plausible_mpp(value: float | None) -> bool:
    return value is not None and MPP_RANGE[0] <= value <= MPP_RANGE[1]


def mpp_from_properties(props: Mapping[str, str]) -> float | None:
    """Level-0 um/px from slide properties, or None when the slide does not say.

    Order: ``openslide.mpp-x``/``-y`` (averaged if both, they differ only by rounding on real
    scanners), then ``tiff.XResolution``/``tiff.YResolution`` with ``tiff.ResolutionUnit`` of
    centimeter or inch. A unit of "none" or a value outside ``MPP_RANGE`` counts as missing.
    """
    mx = _positive_float(props.get("openslide.mpp-x"))
    my = _positive_float(props.get("openslide.mpp-y"))
    vals = [v for v in (mx, my) if v is not None]
    if vals:
        mpp = sum(vals) / len(vals)
        if plausible_mpp(mpp):
            return mpp
        log.warning("ignoring implausible openslide.mpp-x/y %s", vals)

    unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
    per_unit = _UNIT_TO_UM.get(unit)
    if per_unit is None:
        return None
    rx = _positive_float(props.get("tiff.XResolution"))
    ry = _positive_float(props.get("tiff.YResolution"))
    res = [per_unit / r for r in (rx, ry) if r is not None]
    if not res:
        return None
    mpp = sum(res) / len(res)
    return mpp if plausible_mpp(mpp) else None


#: the documented opt-in rule: level-0 um/px = MAGNIFICATION_RULE_UM / objective power (40x -> 0.25)
MAGNIFICATION_RULE_UM = 10.0
#: a manifest mpp further than this (relative) from the file's own is flagged
MPP_DISAGREEMENT = 0.10
_POWER_KEYS = ("openslide.objective-power", "aperio.AppMag")


def objective_power(props: Mapping[str, str]) -> float | None:
    """Scanner objective power (e.g. 20, 40) from ``openslide.objective-power`` or ``aperio.AppMag``."""
    for key in _POWER_KEYS:
        power = _positive_float(props.get(key))
        if power is not None and 1.0 <= power <= 200.0:
            return power
    return None


def mpp_from_magnification(power: float) -> float:
    """The opt-in rule 10 um / objective power: 40x -> 0.25, 20x -> 0.5 um/px (a convention, not a
    measurement: real scanners differ by a few per cent, e.g. 0.2525 or 0.499)."""
    return MAGNIFICATION_RULE_UM / float(power)


def mpp_disagreement(manifest_mpp: float | None, file_mpp: float | None,
                     tolerance: float = MPP_DISAGREEMENT) -> str | None:
    """A warning text when a manifest mpp differs from the file's own by more than ``tolerance``."""
    if manifest_mpp is None or file_mpp is None:
        return None
    rel = abs(float(manifest_mpp) - float(file_mpp)) / float(file_mpp)
    if rel <= tolerance:
        return None
    return (f"manifest mpp {float(manifest_mpp):g} disagrees with the slide's own {float(file_mpp):g} um/px "
            f"by {rel:.0%} (> {tolerance:.0%}); the manifest value is used")
