"""Kernel Attention Transformer (KAT; Zheng et al., MICCAI 2022 / IEEE TMI 2023), checkpoint-compatible.

Why a reimplementation: the official code (GitHub ``Zhengyushan/kat``, MIT) hard-codes CUDA, a fixed kernel
count and ``-1e9`` masking (which overflows under fp16). This module keeps its exact semantics
(/work/shared/design/kat.md sections 4, 5 and 8) so official ``state_dict`` files load with ``strict=True`` and
give the same logits, while taking variable-size padded batches, CPU/CUDA and autocast.

Semantics kept on purpose (each pinned by tests/test_kat_model.py):
- No positional embedding; space enters only via Gaussian masks ``M_l = exp(-d^2 / (2*npk*2^l))`` on the
  anchor-to-tile distance d (sampled-grid units), block l = 0..depth-1. ``M_l`` multiplies the *post-softmax*
  weights with no renormalisation (rows sum to <= 1).
- Each block: one LayerNorm normalises patch, kernel and cls tokens and **the normalised tensors become the
  residual stream** (not the usual pre-norm ``x + f(LN(x))``); then patch->kernel (x M^T), kernel->patch (x M)
  and cls->kernel (no Gaussian) attention, all sharing one bias-free ``to_qkv`` and one ``to_out``; then one
  shared PreNorm GELU(erf) MLP on all three token sets. Logits = Linear(LayerNorm(cls)).
- All kernel tokens start as one shared learned token, so block-0 cls->kernel attention is exactly uniform.
- Masked scores are filled with the score dtype's minimum (torch.finfo), not -1e9, so fp16/bf16 autocast works;
  masked entries get exactly zero weight, so padding (tiles or kernels) is exactly inert.

state_dict layout (identical to the official ``KAT``; no buffers): ``cls_token``, ``kernel_token``,
``to_patch_embedding.{weight,bias}``, ``kt.layers.{l}.0.*`` (block LN), ``kt.layers.{l}.1.to_qkv.weight``,
``kt.layers.{l}.1.to_out.0.*``, ``kt.layers.{l}.2.norm.*``, ``kt.layers.{l}.2.fn.net.{0,3}.*``,
``mlp_head.{0,1}.*``. ``npk``, dropouts and the kernel count leave no trace in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .kernels import KernelPlan, build_kernels  # noqa: F401  (public re-export)

__all__ = ["KernelAttentionTransformer", "KernelPlan", "build_kernels", "load_official_checkpoint",
           "tile_attention_scores", "ATTENTION_KEYS"]

ATTENTION_KEYS: tuple[str, ...] = ("patch_to_kernel", "kernel_to_patch", "cls_to_kernel")


class FeedForward(nn.Module):
    """Linear -> GELU (exact erf) -> Dropout -> Linear -> Dropout; attribute ``net`` matches official keys."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    """``fn(LayerNorm(x))``; attribute names ``norm`` / ``fn`` match official keys."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


def _masked_softmax(scores: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with ``blocked`` entries set to the dtype minimum (finite under fp16).

    A fully blocked row (a padded query) becomes uniform rather than NaN; its output is never read.
    """
    return scores.masked_fill(blocked, torch.finfo(scores.dtype).min).softmax(dim=-1)


class KernelAttention(nn.Module):
    """The three cross-attentions of one KAT block with shared ``to_qkv`` (no bias) and ``to_out``.

    Inputs are the already-normalised tokens. ``gaussian`` is [B, 1, m, n] (M_l), ``blocked`` [B, 1, n, m] is True
    where the tile or the kernel is padding, ``kernel_blocked`` [B, 1, 1, m] True for padded kernels.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        # Official rule: to_out is Identity iff dim_head == dim, which only works with one head.
        project_out = dim_head != dim
        if not project_out and heads != 1:
            raise ValueError(f"dim_head == dim ({dim}) gives an Identity to_out, which needs heads == 1 "
                             f"(got heads={heads}); the official code fails the same way")
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = (nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))
                       if project_out else nn.Identity())

    def _qkv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, dim] -> q, k, v each [B, h, L, d]; chunk order q|k|v, channel = head * d + j (official)."""
        b, length, _ = tokens.shape
        qkv = self.to_qkv(tokens).view(b, length, 3, self.heads, self.dim_head)
        return tuple(t.transpose(1, 2) for t in qkv.unbind(dim=2))  # type: ignore[return-value]

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        b, h, length, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, length, h * d))

    def forward(self, x: torch.Tensor, kernels: torch.Tensor, cls: torch.Tensor, gaussian: torch.Tensor,
                blocked: torch.Tensor, kernel_blocked: torch.Tensor, record: bool = False):
        q_x, k_x, v_x = self._qkv(x)
        q_k, k_k, v_k = self._qkv(kernels)
        q_c = self._qkv(cls)[0]

        # Patch queries -> kernel keys/values (information summary flow): softmax over kernels, then x M^T.
        w_pk = _masked_softmax((q_x @ k_k.transpose(-1, -2)) * self.scale, blocked)
        w_pk = w_pk * gaussian.transpose(-1, -2).to(w_pk.dtype)
        out_x = w_pk @ v_k.to(w_pk.dtype)

        # Kernel queries -> patch keys/values (information distribution flow): softmax over tiles, then x M.
        w_kp = _masked_softmax((q_k @ k_x.transpose(-1, -2)) * self.scale, blocked.transpose(-1, -2))
        w_kp = w_kp * gaussian.to(w_kp.dtype)
        out_k = w_kp @ v_x.to(w_kp.dtype)

        # Cls query -> kernel keys/values: plain masked softmax, no Gaussian.
        w_ck = _masked_softmax((q_c @ k_k.transpose(-1, -2)) * self.scale, kernel_blocked)
        out_c = w_ck @ v_k.to(w_ck.dtype)

        attn = {"patch_to_kernel": w_pk, "kernel_to_patch": w_kp, "cls_to_kernel": w_ck[:, :, 0]} if record else None
        return self._merge(out_x), self._merge(out_k), self._merge(out_c), attn


class KATBlocks(nn.Module):
    """Container whose ``layers`` reproduce the official ``kt.layers.{l}.{0,1,2}`` nesting."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                nn.LayerNorm(dim),
                KernelAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                PreNorm(dim, FeedForward(dim, mlp_dim, dropout=dropout)),
            ]) for _ in range(depth)
        ])


class KernelAttentionTransformer(nn.Module):
    """KAT slide classifier.

    Args:
        patch_dim: tile feature size P (PLIP: 512).
        num_classes: C (HER2: 4).
        dim, depth, heads, dim_head, mlp_dim: transformer sizes (official defaults 256, 4, 8, 64, 512).
        npk: tiles per kernel; sets the Gaussian variance ``npk * 2^l`` of block l. Must equal the npk used in
            :func:`build_kernels`. Not stored in the state_dict.
        dropout: dropout in ``to_out`` and the MLP (official hard-coded 0.5).
        emb_dropout: dropout after the patch embedding (official 0).

    ``self.hparams`` holds these constructor arguments (for saving alongside the state_dict).
    """

    def __init__(self, patch_dim: int, num_classes: int, dim: int = 256, depth: int = 4, heads: int = 8,
                 dim_head: int = 64, mlp_dim: int = 512, npk: float = 144, dropout: float = 0.5,
                 emb_dropout: float = 0.0):
        super().__init__()
        if npk <= 0:
            raise ValueError(f"npk must be positive, got {npk}")
        if depth < 2:
            # In every block the class token reads the kernel tokens as they entered it; in block 0 these are
            # copies of one learned token, so with a single block the logits ignore the slide (official order).
            raise ValueError(f"depth must be >= 2 (with depth {depth} the class token never sees a tile: it "
                             f"reads the kernel tokens before their first update); got {depth}")
        self.hparams: dict[str, Any] = dict(patch_dim=patch_dim, num_classes=num_classes, dim=dim, depth=depth,
                                            heads=heads, dim_head=dim_head, mlp_dim=mlp_dim, npk=npk,
                                            dropout=dropout, emb_dropout=emb_dropout)
        self.npk = npk
        self.depth = depth
        # Registration order reproduces the official state_dict order.
        self.to_patch_embedding = nn.Linear(patch_dim, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.kernel_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.kt = KATBlocks(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def gaussian_variance(self, block: int) -> float:
        """sigma^2 of block ``block``'s Gaussian mask: npk * 2^block (grid units squared)."""
        return float(self.npk) * 2.0 ** block

    def forward(self, features: torch.Tensor, anchor_dist: torch.Tensor, tile_mask: torch.Tensor | None = None,
                kernel_mask: torch.Tensor | None = None, return_attention: bool = False):
        """Logits [B, C] from padded bags.

        Args:
            features: [B, n, P] tile features (padded rows may hold anything, even NaN; they are zeroed).
            anchor_dist: [B, m, n] anchor-to-tile distances in sampled-grid units (``KernelPlan.anchor_dist``);
                entries of padded tiles/kernels are ignored.
            tile_mask: [B, n] bool, True = real tile (None = all real).
            kernel_mask: [B, m] bool, True = real kernel (None = all real).
            return_attention: also return ``{"patch_to_kernel": [depth x [B,h,n,m]], "kernel_to_patch":
                [depth x [B,h,m,n]], "cls_to_kernel": [depth x [B,h,m]]}``, the *effective* weights (softmax
                times Gaussian where applicable). Logits are unchanged by this flag.
        """
        record = range(self.depth) if return_attention else ()
        logits, attn = self._forward(features, anchor_dist, tile_mask, kernel_mask, record)
        return (logits, attn) if return_attention else logits

    def _forward(self, features: torch.Tensor, anchor_dist: torch.Tensor, tile_mask: torch.Tensor | None,
                 kernel_mask: torch.Tensor | None, record_blocks: Iterable[int] = ()):
        b, n, _ = features.shape
        m = anchor_dist.shape[1]
        if anchor_dist.shape != (b, m, n):
            raise ValueError(f"anchor_dist must be [B, m, n] = [{b}, m, {n}]; got {tuple(anchor_dist.shape)}")
        dev = features.device
        tile_mask = (torch.ones(b, n, dtype=torch.bool, device=dev) if tile_mask is None
                     else tile_mask.to(device=dev, dtype=torch.bool))
        kernel_mask = (torch.ones(b, m, dtype=torch.bool, device=dev) if kernel_mask is None
                       else kernel_mask.to(device=dev, dtype=torch.bool))
        record_blocks = set(record_blocks)

        # Zero padded rows so garbage (even inf/nan) in padding cannot leak through 0 * value products.
        features = features.masked_fill(~tile_mask[:, :, None], 0.0)
        x = self.dropout(self.to_patch_embedding(features))
        cls = self.cls_token.expand(b, 1, -1)
        kernels = self.kernel_token.expand(b, m, -1)

        blocked = ~(tile_mask[:, :, None] & kernel_mask[:, None, :])[:, None]       # [B, 1, n, m]
        kernel_blocked = ~kernel_mask[:, None, None, :]                              # [B, 1, 1, m]
        # Gaussian in float32 (as the official .float() inputs), float64 only if distances come as float64.
        dist_dtype = torch.float64 if anchor_dist.dtype == torch.float64 else torch.float32
        dist_sq = anchor_dist.to(device=dev, dtype=dist_dtype).square()[:, None]      # [B, 1, m, n]
        dist_sq = dist_sq.masked_fill(blocked.transpose(-1, -2), 0.0)  # padding garbage cannot become NaN

        attn: dict[str, list[torch.Tensor | None]] = {k: [None] * self.depth for k in ATTENTION_KEYS}
        for block, (norm, attention, ff) in enumerate(self.kt.layers):
            # Normalised tensors replace the stream (official behaviour, not x + f(LN(x))).
            x, kernels, cls = norm(x), norm(kernels), norm(cls)
            gaussian = torch.exp(-dist_sq / (2 * self.npk * 2 ** block))
            out_x, out_k, out_c, rec = attention(x, kernels, cls, gaussian, blocked, kernel_blocked,
                                                 record=block in record_blocks)
            x, cls, kernels = x + out_x, cls + out_c, kernels + out_k
            x, cls, kernels = ff(x) + x, ff(cls) + cls, ff(kernels) + kernels
            if rec is not None:
                for key, value in rec.items():
                    attn[key][block] = value
        return self.mlp_head(cls[:, 0]), attn


def _batch_args(features: Any, anchor_dist: Any, tile_mask: Any, kernel_mask: Any):
    if isinstance(features, Mapping):
        batch = features
        return batch["features"], batch["anchor_dist"], batch.get("tile_mask"), batch.get("kernel_mask")
    if anchor_dist is None:
        raise TypeError("tile_attention_scores needs anchor_dist (or a collate_bags batch dict)")
    return features, anchor_dist, tile_mask, kernel_mask


@torch.no_grad()
def tile_attention_scores(model: KernelAttentionTransformer, features: Any, anchor_dist: torch.Tensor | None = None,
                          tile_mask: torch.Tensor | None = None, kernel_mask: torch.Tensor | None = None, *,
                          projection_block: int | None = None) -> torch.Tensor:
    """Per-tile relevance [B, n] for heatmaps (kat.md section 7 proposal; not from the official repo).

    ``s_i = sum_k alpha_k * W'[k, i]`` where ``alpha`` is the head-mean cls->kernel weight of the *last* block
    (the only slide-level readout; block 0 is uniform by construction) and ``W'`` the head-mean effective
    (softmax x Gaussian) kernel->patch weights of ``projection_block`` (default ``depth - 2``, the last block
    whose kernel update the final cls read sees; 0 for depth 1). Scores are >= 0, sum to <= 1 per slide and are 0
    on padded tiles; rescale (e.g. min-max per slide) for display.

    ``features`` may also be a :func:`her2ray.models.bags.collate_bags` batch dict. Runs in eval mode (the
    model's training flag is restored afterwards) without gradients.
    """
    features, anchor_dist, tile_mask, kernel_mask = _batch_args(features, anchor_dist, tile_mask, kernel_mask)
    last = model.depth - 1
    proj = max(last - 1, 0) if projection_block is None else int(projection_block)
    if not 0 <= proj < model.depth:
        raise ValueError(f"projection_block must be in [0, {model.depth}); got {projection_block}")
    was_training = model.training
    model.eval()
    try:
        _, attn = model._forward(features, anchor_dist, tile_mask, kernel_mask, record_blocks={last, proj})
    finally:
        model.train(was_training)
    alpha = attn["cls_to_kernel"][last].float().mean(dim=1)              # [B, m]
    w_kp = attn["kernel_to_patch"][proj].float().mean(dim=1)             # [B, m, n]
    scores = torch.einsum("bm,bmn->bn", alpha, w_kp)
    if tile_mask is not None:
        scores = scores.masked_fill(~tile_mask.to(device=scores.device, dtype=torch.bool), 0.0)
    return scores


def load_official_checkpoint(path_or_dict: Any, patch_dim: int | None = None, num_classes: int | None = None,
                             *, trusted: bool = False, **hparams: Any) -> KernelAttentionTransformer:
    """A KernelAttentionTransformer (eval mode) with an official (or her2ray) checkpoint's weights, strict.

    Accepts a path/URL or loaded object; unwraps ``state_dict``, ``module.``, KATCL ``online_kat.``; reads
    heads/dim_head/npk from a saved ``args`` Namespace or her2ray ``hparams``; raises CheckpointError naming
    missing/unexpected/mis-shaped keys. Full details: :func:`her2ray.models.checkpoints.load_official_checkpoint`.
    """
    from .checkpoints import load_official_checkpoint as _load

    return _load(path_or_dict, patch_dim=patch_dim, num_classes=num_classes, trusted=trusted, **hparams)
