"""Gated attention MIL (Ilse, Tomczak & Welling, ICML 2018) as the baseline aggregator next to KAT.

Why it is here: a HER2 result from KAT means more when a simple, well-known MIL pooling trained under the
identical protocol (same splits, sampler, augmentation, early stopping) is reported beside it.

The forward signature is the KAT one (``features, anchor_dist, tile_mask, kernel_mask,
return_attention``) so the trainer, scorer and heatmap code never branch on the model type; the
anchor inputs are accepted and ignored. Padded tiles (``tile_mask`` False) get exactly zero attention
and their feature values never reach the output, whatever they contain.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedABMIL(nn.Module):
    """Embed tiles (Linear+ReLU), gated attention pooling, linear classifier.

    Paper settings map as: embedding M = ``dim``, attention hidden L = ``attn_dim`` (default dim // 2,
    the paper's 500/128 ratio is close to 4; we keep the head small because PLIP features are
    already a good embedding).
    """

    def __init__(self, patch_dim: int, num_classes: int, dim: int = 256, dropout: float = 0.25,
                 attn_dim: int | None = None):
        super().__init__()
        attn_dim = attn_dim or max(1, dim // 2)
        self.patch_dim, self.num_classes, self.dim = patch_dim, num_classes, dim
        self.embed = nn.Sequential(nn.Linear(patch_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(dim, attn_dim)   # tanh branch
        self.attn_u = nn.Linear(dim, attn_dim)   # sigmoid gate
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor, anchor_dist: torch.Tensor | None = None,
                tile_mask: torch.Tensor | None = None, kernel_mask: torch.Tensor | None = None,
                return_attention: bool = False):
        """``features`` [B, n, P], ``tile_mask`` [B, n] bool (True = real tile) -> logits [B, C].

        With ``return_attention`` also returns ``{"tile": [B, n]}`` softmax weights (0 on padding).
        """
        del anchor_dist, kernel_mask  # KAT-only inputs; accepted for a uniform trainer interface
        if features.dim() == 2:
            features = features.unsqueeze(0)
        b, n, _ = features.shape
        if tile_mask is None:
            tile_mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        tile_mask = tile_mask.bool()
        # Zero padded rows before the embedding so NaN/inf padding cannot leak (0 * nan = nan).
        features = features.masked_fill(~tile_mask.unsqueeze(-1), 0.0)
        h = self.embed(features)                                            # [B, n, dim]
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        scores = scores.masked_fill(~tile_mask, float("-inf"))
        empty = ~tile_mask.any(dim=1, keepdim=True)                          # bags with no tile at all
        scores = scores.masked_fill(empty, 0.0)
        attn = torch.softmax(scores, dim=1)
        attn = attn.masked_fill(~tile_mask, 0.0)
        pooled = torch.bmm(attn.unsqueeze(1), h.masked_fill(~tile_mask.unsqueeze(-1), 0.0)).squeeze(1)
        logits = self.classifier(pooled)
        if return_attention:
            return logits, {"tile": attn}
        return logits
