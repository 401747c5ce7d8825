"""Gated ABMIL: KAT-compatible signature, inert padding, attention semantics, the model factory."""

from __future__ import annotations

import pytest
import torch

from her2ray.models import build_model
from her2ray.models.abmil import GatedABMIL


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GatedABMIL(patch_dim=16, num_classes=4, dim=32, dropout=0.0).eval()


def test_shapes_and_attention(model):
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    logits, attn = model(x, None, mask, None, return_attention=True)
    assert logits.shape == (2, 4)
    a = attn["tile"]
    assert a.shape == (2, 10)
    assert torch.allclose(a.sum(1), torch.ones(2))
    assert torch.all(a[1, 6:] == 0)


def test_padding_is_inert_even_with_nan(model):
    x = torch.randn(1, 7, 16)
    alone = model(x, torch.zeros(1, 3, 7), torch.ones(1, 7, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))
    padded = torch.full((1, 12, 16), float("nan"))
    padded[:, :7] = x
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[:, :7] = True
    out = model(padded, torch.randn(1, 5, 12), mask, torch.ones(1, 5, dtype=torch.bool))
    assert torch.allclose(alone, out, atol=1e-6)


def test_permutation_invariant_and_ignores_anchor_inputs(model):
    x = torch.randn(1, 9, 16)
    perm = torch.randperm(9)
    a = model(x, torch.randn(1, 2, 9), None, None)
    b = model(x[:, perm], torch.randn(1, 4, 9), None, None)
    assert torch.allclose(a, b, atol=1e-5)


def test_gradients_flow_and_empty_bag_is_finite(model):
    model.train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2] = False
    out = model(x, None, mask, None)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and torch.all(x.grad[2] == 0)


def test_build_model_factory_same_signature():
    feats, dist = torch.randn(2, 12, 8), torch.rand(2, 3, 12) * 4
    tmask, kmask = torch.ones(2, 12, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    for name, hp in (("abmil", {"dim": 16, "dropout": 0.0, "npk": 16, "max_nodes": 64}),
                     ("kat", {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "mlp_dim": 16, "npk": 16,
                              "max_nodes": 64})):
        m = build_model(name, 8, 4, **hp).eval()
        assert m(feats, dist, tmask, kmask).shape == (2, 4)
    assert isinstance(build_model("ABMIL", 8, 4), GatedABMIL)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("transmil", 8, 4)
    with pytest.raises(TypeError):
        build_model("abmil", 8, 4, depth=3)
