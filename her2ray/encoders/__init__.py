"""Tile encoders: PLIP (CLIP ViT-B/32, QuickGELU) and any other open_clip image tower, behind one class.

``load_encoder(name, weights, device, precision) -> TileEncoder``; ``TileEncoder.embed_tiles(uint8 [N,H,W,3])
-> float32 [N, dim]``; ``TileEncoder.identity`` records name, architecture, weights SHA-256, dim and source.
"""

from .loader import CLIP_MEAN, CLIP_STD, PLIP_ARCH, PLIP_HUB_ID, load_encoder, write_open_clip_dir
from .tile_encoder import PRECISIONS, TileEncoder, default_device, default_precision

__all__ = ["load_encoder", "TileEncoder", "write_open_clip_dir", "PLIP_ARCH", "PLIP_HUB_ID", "CLIP_MEAN",
           "CLIP_STD", "PRECISIONS", "default_device", "default_precision"]
