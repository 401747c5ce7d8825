"""QuPath-importable GeoJSON of tile scores: one detection square per tile, in level-0 pixel coordinates.

QuPath's GeoJSON conventions (File > Import objects, or drag and drop; 0.4+): a ``FeatureCollection`` of
``Feature``s with a ``Polygon`` geometry in full-resolution pixel units (origin top-left, y down),
``properties.objectType`` = ``"detection"`` (tiles are measurements, not editable annotations) and
``properties.measurements`` a mapping name -> number. Rings are closed (first point repeated). Detections are
cheap in QuPath, so a 50k-tile slide stays usable; colour them by the measurement (Measure > Show measurement
maps) to get the heatmap on the full-resolution slide.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np

from .. import storage


def tile_polygon(x: float, y: float, size: float) -> dict[str, Any]:
    """Closed square ring (clockwise in image coordinates) of a tile's top-left (x, y) and edge ``size``."""
    x0, y0, x1, y1 = float(x), float(y), float(x) + float(size), float(y) + float(size)
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def tiles_feature_collection(x: np.ndarray, y: np.ndarray, scores: np.ndarray, tile_size: float,
                             measurement: str = "attention", extra: dict[str, np.ndarray] | None = None,
                             classification: str | None = None, slide_id: str | None = None) -> dict[str, Any]:
    """FeatureCollection of tile detections; ``measurement`` (and the ``extra`` columns) as numeric measurements.

    Non-finite scores are skipped (JSON has no NaN and QuPath would reject the file).
    """
    features = []
    extra = extra or {}
    for i, (xi, yi, si) in enumerate(zip(np.asarray(x), np.asarray(y), np.asarray(scores, dtype=np.float64))):
        if not np.isfinite(si):
            continue
        meas = {measurement: float(si)}
        for name, col in extra.items():
            v = float(np.asarray(col)[i])
            if np.isfinite(v):
                meas[name] = v
        props: dict[str, Any] = {"objectType": "detection", "isLocked": True, "measurements": meas}
        if classification:
            props["classification"] = {"name": classification}
        features.append({"type": "Feature", "id": str(uuid.uuid4()), "geometry": tile_polygon(xi, yi, tile_size),
                         "properties": props})
    fc: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if slide_id:
        fc["her2ray"] = {"slide_id": slide_id, "tile_size_level0_px": float(tile_size), "measurement": measurement}
    return fc


def write_geojson(url: str, collection: dict[str, Any]) -> None:
    """Compact JSON, one atomic write (a viewer never loads half a file)."""
    storage.write_text_atomic(url, json.dumps(collection, separators=(",", ":"), allow_nan=False))


__all__ = ["tile_polygon", "tiles_feature_collection", "write_geojson"]
