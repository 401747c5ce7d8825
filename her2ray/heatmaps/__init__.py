"""Attention heatmaps: PNG (thumbnail | overlay, colour bar, prediction) and QuPath GeoJSON tile detections.

``render``: pure drawing from arrays. ``geojson``: tiles -> FeatureCollection. ``pipeline``: slides and
attention files -> files on disk/S3, one Ray task per slide.
"""

from .geojson import tile_polygon, tiles_feature_collection, write_geojson
from .render import HeatmapLayout, normalize_scores, prediction_title, render_heatmap, score_grid

__all__ = ["HeatmapLayout", "normalize_scores", "prediction_title", "render_heatmap", "score_grid",
           "tile_polygon", "tiles_feature_collection", "write_geojson"]
