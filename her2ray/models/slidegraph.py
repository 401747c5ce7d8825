"""SlideGraph+ (Lu et al., Medical Image Analysis 2022) as a her2ray slide model, in plain torch.

Architecture (as the TIAToolbox SlideGraph+ HER2 pipeline's ``SlideGraphArch``; own code, torch only):

- ``first_h``: Linear(P, layers[0]) -> BatchNorm -> ReLU on every node;
- then one EdgeConv per further entry of ``layers``: ``h_i' = max_{j in N(i)} MLP([h_i, h_j - h_i])`` with
  MLP = Linear(2 d, d') -> BatchNorm -> ReLU (max aggregation; a node without edges gets 0, like PyG);
- after the input layer and after every EdgeConv, a per-layer linear head maps each node to C logits
  (node-level predictions); each head's node logits are pooled per graph (``pooling``: mean/max/add),
  dropout is applied to the pooled logits, and the layers' pooled logits are **summed** into the slide logits.

Node importance for heatmaps: with mean pooling a node's share of the slide logits is exactly
``sum_l head_l(h_i^l) / N``; :func:`node_scores` turns the summed node logits into a per-node relevance
(softmax over classes of the node's summed logits, probability of the slide's predicted class), and the
scorer maps it back to every tile of the node.

Inputs are packed graphs (``collate_graphs``): ``x`` [N_total, P], ``edge_index`` [2, E] (global node
indices), ``batch`` [N_total] (graph of each node), ``num_graphs`` B.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

POOLINGS = ("mean", "max", "add")


class _SafeBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that uses its running statistics when a training batch holds a single node."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        return super().forward(x)


def _block(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), _SafeBatchNorm(out_dim), nn.ReLU())


def scatter_pool(values: torch.Tensor, index: torch.Tensor, size: int, how: str) -> torch.Tensor:
    """Per-group mean / max / sum of ``values`` [N, C] by ``index`` [N] into [size, C] (empty groups: 0)."""
    out = values.new_zeros(size, values.shape[1])
    idx = index.view(-1, 1).expand_as(values)
    if how == "max":
        return out.scatter_reduce(0, idx, values, reduce="amax", include_self=False)
    out = out.index_add(0, index, values)
    if how == "mean":
        counts = torch.bincount(index, minlength=size).clamp(min=1).to(values.dtype).unsqueeze(1)
        out = out / counts
    return out


class EdgeConv(nn.Module):
    """``h_i' = max_{j: (j -> i) in edges} mlp([h_i, h_j - h_i])`` (Wang et al., DGCNN), max aggregation."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = _block(2 * in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index[0], edge_index[1]
        if src.numel() == 0:
            return h.new_zeros(h.shape[0], self.out_dim)
        msg = self.mlp(torch.cat([h[dst], h[src] - h[dst]], dim=1))
        return scatter_pool(msg, dst, h.shape[0], "max")


class SlideGraphPlus(nn.Module):
    """SlideGraph+ GNN. ``hparams`` also carries the graph-construction settings (data side, not weights).

    Args:
        patch_dim: node (tile) feature size P.
        num_classes: C.
        layers: widths; ``layers[0]`` is the input embedding, each further entry one EdgeConv
            (TIAToolbox HER2 notebook: [16, 16, 8]).
        dropout: on each layer's pooled logits (notebook 0.5).
        pooling: node -> graph pooling of node logits (notebook "mean").
        graph: graph-construction settings (``GraphParams`` fields); stored in ``hparams`` only.
    """

    def __init__(self, patch_dim: int, num_classes: int, layers: tuple[int, ...] | list[int] = (16, 16, 8),
                 dropout: float = 0.5, pooling: str = "mean", graph: dict[str, Any] | None = None):
        super().__init__()
        layers = [int(v) for v in layers]
        if not layers or min(layers) < 1:
            raise ValueError(f"layers must be positive widths, got {layers}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.hparams: dict[str, Any] = dict(patch_dim=patch_dim, num_classes=num_classes, layers=layers,
                                            dropout=dropout, pooling=pooling, graph=dict(graph or {}))
        self.pooling, self.dropout = pooling, float(dropout)
        self.first_h = _block(patch_dim, layers[0])
        self.convs = nn.ModuleList([EdgeConv(a, b) for a, b in zip(layers[:-1], layers[1:])])
        self.heads = nn.ModuleList([nn.Linear(w, num_classes) for w in layers])

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor, num_graphs: int,
                return_attention: bool = False):
        """Slide logits [B, C]; with ``return_attention`` also ``{"node": summed node logits [N_total, C]}``."""
        h = self.first_h(x)
        edge_index = edge_index.long()
        logits = 0
        node_logits = 0
        for layer, head in enumerate(self.heads):
            if layer > 0:
                h = self.convs[layer - 1](h, edge_index)
            node_pred = head(h)
            node_logits = node_logits + node_pred
            pooled = scatter_pool(node_pred, batch, num_graphs, self.pooling)
            logits = logits + nn.functional.dropout(pooled, p=self.dropout, training=self.training)
        if return_attention:
            return logits, {"node": node_logits}
        return logits

    def forward_batch(self, batch: dict[str, Any], return_attention: bool = False):
        """Forward on a :func:`her2ray.models.slidegraph_data.collate_graphs` batch."""
        return self(batch["features"], batch["edge_index"], batch["batch"], int(batch["num_graphs"]),
                    return_attention=return_attention)


def node_scores(node_logits: torch.Tensor, batch: torch.Tensor, slide_logits: torch.Tensor) -> torch.Tensor:
    """Per-node relevance in [0, 1]: the node's own probability (softmax of its summed per-layer logits) of
    the class its slide is predicted as."""
    pred = slide_logits.argmax(dim=1)[batch]                    # [N_total]
    probs = torch.softmax(node_logits.float(), dim=1)
    return probs.gather(1, pred.view(-1, 1)).squeeze(1)
