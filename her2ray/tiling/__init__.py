"""Slide -> tiles: tissue mask, level choice, tile grid at a target MPP, and bulk tile reading.

``plan_tiles(reader, cfg) -> TileGrid`` decides which tiles exist (level-0 px, row-major);
``read_tiles`` / ``iter_tile_batches`` turn them into uint8 RGB arrays [N, tile_px, tile_px, 3].
"""

from .config import TilingConfig
from .grid import TileGrid, grid_cells, plan_tiles, tile_tissue_fractions
from .levels import LevelChoice, choose_level
from .mask import mask_thumbnail_px, save_mask_png, saturation, slide_tissue_mask, tissue_mask
from .read import default_workers, iter_tile_batches, read_tiles, resize_tile

__all__ = [
    "LevelChoice", "TileGrid", "TilingConfig", "choose_level", "default_workers", "grid_cells",
    "iter_tile_batches", "mask_thumbnail_px", "plan_tiles", "read_tiles", "resize_tile", "saturation",
    "save_mask_png", "slide_tissue_mask", "tile_tissue_fractions", "tissue_mask",
]
