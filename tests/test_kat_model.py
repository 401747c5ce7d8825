"""KernelAttentionTransformer: semantics pinned against kat.md (official KAT), padding, autocast, checkpoints.

The centrepiece is ``reference_logits``: an independent, deliberately naive forward written from the kat.md
text (per slide, per head, float64, explicit LayerNorm / erf-GELU / softmax), fed with the model's own weights.
"""

from __future__ import annotations

import argparse
import math
import pathlib

import pytest
import torch

from her2ray.models.checkpoints import CheckpointError
from her2ray.models.kat import KernelAttentionTransformer, load_official_checkpoint, tile_attention_scores



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: intra-op threads only add barrier waits (80x slower on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = dict(dim=8, depth=3, heads=2, dim_head=4, mlp_dim=12, npk=4.0, dropout=0.0)


# ----------------------------------------------------------------------------------------------------------
# Independent reference (kat.md 5.2 / 5.3)
# ----------------------------------------------------------------------------------------------------------

def _ln(t, w, b, eps=1e-5):
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + eps) * w + b


def _gelu_erf(t):
    return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))


def _softmax_rows(s):
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def reference_logits(sd, feats, dist, *, npk, heads, dim_head, renormalise=False, standard_prenorm=False):
    """One unpadded slide. feats [n, P], dist [m, n]. Returns (logits [C], per-block maps)."""
    sd = {k: v.double() for k, v in sd.items()}
    feats, dist = feats.double(), dist.double()
    depth = len({k.split(".")[2] for k in sd if k.startswith("kt.layers.")})
    inner = heads * dim_head
    m = dist.shape[0]
    x = torch.einsum("np,dp->nd", feats, sd["to_patch_embedding.weight"]) + sd["to_patch_embedding.bias"]
    kern = sd["kernel_token"][0, 0].expand(m, -1)
    cls = sd["cls_token"][0]                                  # [1, dim]
    maps = []
    for l in range(depth):
        p = f"kt.layers.{l}."
        w_qkv = sd[p + "1.to_qkv.weight"]
        wq, wk, wv = w_qkv[:inner], w_qkv[inner:2 * inner], w_qkv[2 * inner:]
        xn, kn, cn = (_ln(t, sd[p + "0.weight"], sd[p + "0.bias"]) for t in (x, kern, cls))
        gauss = torch.exp(-dist ** 2 / (2 * npk * 2 ** l))     # [m, n]
        heads_x, heads_k, heads_c, block_maps = [], [], [], []
        for h in range(heads):
            s = slice(h * dim_head, (h + 1) * dim_head)
            qx, kx, vx = (torch.einsum("nd,ed->ne", xn, w[s]) for w in (wq, wk, wv))
            qk, kk, vk = (torch.einsum("nd,ed->ne", kn, w[s]) for w in (wq, wk, wv))
            qc = torch.einsum("nd,ed->ne", cn, wq[s])
            a = _softmax_rows(torch.einsum("ie,je->ij", qx, kk) / math.sqrt(dim_head)) * gauss.T   # [n, m]
            b = _softmax_rows(torch.einsum("ie,je->ij", qk, kx) / math.sqrt(dim_head)) * gauss     # [m, n]
            c = _softmax_rows(torch.einsum("ie,je->ij", qc, kk) / math.sqrt(dim_head))             # [1, m]
            if renormalise:
                a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
            heads_x.append(a @ vk)
            heads_k.append(b @ vx)
            heads_c.append(c @ vk)
            block_maps.append((a, b, c[0]))
        maps.append(block_maps)

        def out(parts, p=p):
            return torch.cat(parts, dim=-1) @ sd[p + "1.to_out.0.weight"].T + sd[p + "1.to_out.0.bias"]

        bx, bk, bc = (x, kern, cls) if standard_prenorm else (xn, kn, cn)
        if standard_prenorm:   # x + attn(LN(x)), the usual pre-norm: NOT what the official code does
            x, kern, cls = bx + out(heads_x), bk + out(heads_k), bc + out(heads_c)
        else:                  # official: normalised tokens are the residual base
            x, kern, cls = xn + out(heads_x), kn + out(heads_k), cn + out(heads_c)

        def ff(t, p=p):
            u = _ln(t, sd[p + "2.norm.weight"], sd[p + "2.norm.bias"])
            u = _gelu_erf(u @ sd[p + "2.fn.net.0.weight"].T + sd[p + "2.fn.net.0.bias"])
            return u @ sd[p + "2.fn.net.3.weight"].T + sd[p + "2.fn.net.3.bias"]

        x, kern, cls = x + ff(x), kern + ff(kern), cls + ff(cls)
    logits = _ln(cls[0], sd["mlp_head.0.weight"], sd["mlp_head.0.bias"]) @ sd["mlp_head.1.weight"].T
    return logits + sd["mlp_head.1.bias"], maps


def _randomise(model, seed=0, std=0.4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if (name.endswith("weight") and p.ndim == 1) else 0.0   # LayerNorm gains around 1
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model.eval()


def _grid_slide(n_rows, n_cols, n_kernels, patch_dim, seed):
    g = torch.Generator().manual_seed(seed)
    rc = torch.stack(torch.meshgrid(torch.arange(n_rows), torch.arange(n_cols), indexing="ij"), -1).reshape(-1, 2)
    anchors = torch.randperm(len(rc), generator=g)[:n_kernels]
    dist = torch.cdist(rc[anchors].double(), rc.double()).float()           # [m, n] grid units
    feats = torch.randn(len(rc), patch_dim, generator=g)
    return feats, dist


def _small_model(seed=0, patch_dim=6, num_classes=3, **overrides):
    torch.manual_seed(seed)
    hp = {**SMALL, **overrides}
    return _randomise(KernelAttentionTransformer(patch_dim, num_classes, **hp), seed=seed)


def _pad_batch(slides):
    n = max(f.shape[0] for f, _ in slides)
    m = max(d.shape[0] for _, d in slides)
    p = slides[0][0].shape[1]
    feats, dist = torch.zeros(len(slides), n, p), torch.zeros(len(slides), m, n)
    tmask, kmask = torch.zeros(len(slides), n, dtype=torch.bool), torch.zeros(len(slides), m, dtype=torch.bool)
    for i, (f, d) in enumerate(slides):
        feats[i, :len(f)], dist[i, :d.shape[0], :len(f)] = f, d
        tmask[i, :len(f)], kmask[i, :d.shape[0]] = True, True
    return feats, dist, tmask, kmask


# ----------------------------------------------------------------------------------------------------------
# Official layout
# ----------------------------------------------------------------------------------------------------------

def official_layout(patch_dim=512, num_classes=4, dim=256, depth=4, inner=512, mlp_dim=512):
    """kat.md 5.6, written out by hand (order as the official state_dict() emits it)."""
    keys = [("cls_token", (1, 1, dim)), ("kernel_token", (1, 1, dim)),
            ("to_patch_embedding.weight", (dim, patch_dim)), ("to_patch_embedding.bias", (dim,))]
    for l in range(depth):
        p = f"kt.layers.{l}."
        keys += [(p + "0.weight", (dim,)), (p + "0.bias", (dim,)),
                 (p + "1.to_qkv.weight", (3 * inner, dim)),
                 (p + "1.to_out.0.weight", (dim, inner)), (p + "1.to_out.0.bias", (dim,)),
                 (p + "2.norm.weight", (dim,)), (p + "2.norm.bias", (dim,)),
                 (p + "2.fn.net.0.weight", (mlp_dim, dim)), (p + "2.fn.net.0.bias", (mlp_dim,)),
                 (p + "2.fn.net.3.weight", (dim, mlp_dim)), (p + "2.fn.net.3.bias", (dim,))]
    keys += [("mlp_head.0.weight", (dim,)), ("mlp_head.0.bias", (dim,)),
             ("mlp_head.1.weight", (num_classes, dim)), ("mlp_head.1.bias", (num_classes,))]
    return keys


def test_state_dict_is_the_official_layout():
    model = KernelAttentionTransformer(512, 4)
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == official_layout()
    assert len(sd) == 52
    assert sum(v.numel() for v in sd.values()) == 3_287_300
    assert list(model.buffers()) == []
    assert not any(isinstance(mod, torch.nn.Linear) and mod.bias is not None
                   for name, mod in model.named_modules() if name.endswith("to_qkv"))


def test_numerics_settings():
    model = KernelAttentionTransformer(16, 2, dim=8, heads=2, dim_head=4, mlp_dim=8, depth=2)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert all(m.approximate == "none" for m in model.modules() if isinstance(m, torch.nn.GELU))
    assert model.gaussian_variance(0) == 144.0 and model.gaussian_variance(3) == 144.0 * 8


def test_depth_one_is_refused_because_its_logits_ignore_the_slide():
    with pytest.raises(ValueError, match="depth must be >= 2"):
        KernelAttentionTransformer(16, 2, dim=8, heads=2, dim_head=4, mlp_dim=8, depth=1)
    torch.manual_seed(0)
    model = KernelAttentionTransformer(16, 2, dim=8, heads=2, dim_head=4, mlp_dim=8, depth=2, dropout=0.0).eval()
    dist = torch.rand(2, 3, 10) * 4
    a, b = model(torch.randn(2, 10, 16), dist), model(torch.randn(2, 10, 16), dist)
    assert (a - b).abs().max() > 1e-4          # two blocks: the logits depend on the tiles


# ----------------------------------------------------------------------------------------------------------
# Semantics against the reference
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_logits_and_attention_equal_independent_reference(seed):
    model = _small_model(seed).double()
    feats, dist = _grid_slide(4, 5, 3, 6, seed)
    logits, attn = model(feats[None].double(), dist[None].double(), return_attention=True)
    ref, maps = reference_logits(model.state_dict(), feats, dist, npk=4.0, heads=2, dim_head=4)
    torch.testing.assert_close(logits[0], ref, atol=1e-10, rtol=1e-10)
    for l in range(3):
        for h in range(2):
            a, b, c = maps[l][h]
            torch.testing.assert_close(attn["patch_to_kernel"][l][0, h], a, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(attn["kernel_to_patch"][l][0, h], b, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(attn["cls_to_kernel"][l][0, h], c, atol=1e-12, rtol=1e-10)


def test_reference_is_sensitive_to_the_pinned_semantics():
    """The two tempting 'fixes' (renormalising after the Gaussian, standard pre-norm) change the logits."""
    model = _small_model(3).double()
    feats, dist = _grid_slide(4, 5, 3, 6, 3)
    ours = model(feats[None].double(), dist[None].double())[0]
    for variant in (dict(renormalise=True), dict(standard_prenorm=True)):
        other, _ = reference_logits(model.state_dict(), feats, dist, npk=4.0, heads=2, dim_head=4, **variant)
        assert (ours - other).abs().max() > 1e-3, variant


def test_float32_matches_reference():
    model = _small_model(5)
    feats, dist = _grid_slide(6, 6, 4, 6, 5)
    ref, _ = reference_logits(model.state_dict(), feats, dist, npk=4.0, heads=2, dim_head=4)
    torch.testing.assert_close(model(feats[None], dist[None])[0].double(), ref, atol=1e-5, rtol=1e-5)


def test_gaussian_formula_per_block_and_no_renormalisation():
    """With zero key weights every softmax is uniform, so effective weights expose M_l exactly."""
    model = _small_model(7)
    inner = 2 * 4
    with torch.no_grad():
        for layer in model.kt.layers:
            layer[1].to_qkv.weight[inner:2 * inner] = 0.0
    feats, dist = _grid_slide(5, 5, 3, 6, 7)
    _, attn = model(feats[None], dist[None], return_attention=True)
    n, m = feats.shape[0], dist.shape[0]
    for l in range(3):
        gauss = torch.exp(-dist ** 2 / (2 * 4.0 * 2 ** l))
        kp = attn["kernel_to_patch"][l][0]                      # [h, m, n]
        pk = attn["patch_to_kernel"][l][0]                      # [h, n, m]
        torch.testing.assert_close(kp * n, gauss.expand_as(kp), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pk * m, gauss.T.expand_as(pk), atol=1e-6, rtol=1e-5)
        assert (kp.sum(-1) < 1 - 1e-3).all()                    # rows not renormalised
        torch.testing.assert_close(attn["cls_to_kernel"][l][0], torch.full((2, m), 1.0 / m))


def test_block0_cls_and_patch_attention_uniform_over_valid_kernels():
    model = _small_model(8)
    slides = [_grid_slide(4, 4, 3, 6, 1), _grid_slide(3, 3, 2, 6, 2)]
    feats, dist, tmask, kmask = _pad_batch(slides)
    _, attn = model(feats, dist, tmask, kmask, return_attention=True)
    c0 = attn["cls_to_kernel"][0]
    torch.testing.assert_close(c0[0], torch.full((2, 3), 1 / 3))
    torch.testing.assert_close(c0[1], torch.tensor([[0.5, 0.5, 0.0]] * 2))
    assert (c0[1, :, 2] == 0).all()                              # padded kernel: exactly zero
    gauss0 = torch.exp(-slides[0][1] ** 2 / (2 * 4.0))
    torch.testing.assert_close(attn["patch_to_kernel"][0][0] * 3, gauss0.T.expand(2, -1, -1))
    assert not torch.allclose(attn["cls_to_kernel"][2][0], torch.full((2, 3), 1 / 3))


def test_shared_weights_across_token_types():
    """One to_qkv/to_out/FF per block (the reference test shows all three token types use them)."""
    model = _small_model(9)
    names = [n for n, _ in model.named_modules() if n.startswith("kt.layers.0.")]
    assert sum(n.endswith("to_qkv") for n in names) == 1 and sum(n.endswith("fn.net") for n in names) == 1


def test_permutation_invariant_over_tiles_and_kernels():
    model = _small_model(10)
    feats, dist = _grid_slide(6, 7, 4, 6, 10)
    base = model(feats[None], dist[None])
    g = torch.Generator().manual_seed(0)
    pt, pk = torch.randperm(feats.shape[0], generator=g), torch.randperm(dist.shape[0], generator=g)
    perm = model(feats[pt][None], dist[pk][:, pt][None])
    torch.testing.assert_close(perm, base, atol=1e-5, rtol=1e-5)


def test_padding_is_inert_even_with_garbage():
    model = _small_model(11)
    slides = [_grid_slide(5, 6, 4, 6, 1), _grid_slide(3, 4, 2, 6, 2), _grid_slide(2, 2, 1, 6, 3)]
    feats, dist, tmask, kmask = _pad_batch(slides)
    batch = model(feats, dist, tmask, kmask)
    feats_g, dist_g = feats.clone(), dist.clone()
    feats_g[~tmask] = float("nan")
    dist_g[~(kmask[:, :, None] & tmask[:, None, :])] = float("nan")
    garbage = model(feats_g, dist_g, tmask, kmask)
    for i, (f, d) in enumerate(slides):
        alone = model(f[None], d[None])[0]
        torch.testing.assert_close(batch[i], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(garbage[i], alone, atol=1e-5, rtol=1e-5)


def test_return_attention_does_not_change_logits_and_backward_works():
    model = _small_model(12, dropout=0.5).train()
    slides = [_grid_slide(4, 5, 3, 6, 1), _grid_slide(3, 3, 2, 6, 2)]
    feats, dist, tmask, kmask = _pad_batch(slides)
    torch.manual_seed(0)
    a = model(feats, dist, tmask, kmask)
    torch.manual_seed(0)
    b, attn = model(feats, dist, tmask, kmask, return_attention=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert set(attn) == {"patch_to_kernel", "kernel_to_patch", "cls_to_kernel"}
    assert [tuple(t.shape) for t in attn["kernel_to_patch"]] == [(2, 2, 3, 20)] * 3
    torch.nn.functional.cross_entropy(b, torch.tensor([0, 2])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.kernel_token.grad.abs().sum() > 0 and model.cls_token.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_is_finite_with_padding(dtype):
    torch.manual_seed(0)
    model = KernelAttentionTransformer(32, 4, dim=32, heads=4, dim_head=8, mlp_dim=64).eval()
    slides = [_grid_slide(8, 9, 5, 32, 1), _grid_slide(3, 4, 1, 32, 2)]
    feats, dist, tmask, kmask = _pad_batch(slides)
    ref = model(feats, dist, tmask, kmask)
    with torch.autocast("cpu", dtype=dtype):
        out, attn = model(feats, dist, tmask, kmask, return_attention=True)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t).all() for maps in attn.values() for t in maps)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)
    with torch.autocast("cpu", dtype=dtype):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(feats, dist, tmask, kmask), torch.tensor([1, 3]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_autocast():
    model = _small_model(13)
    slides = [_grid_slide(6, 6, 3, 6, 1), _grid_slide(3, 4, 2, 6, 2)]
    feats, dist, tmask, kmask = _pad_batch(slides)
    cpu = model(feats, dist, tmask, kmask)
    gpu_model = model.cuda()
    args = [t.cuda() for t in (feats, dist, tmask, kmask)]
    torch.testing.assert_close(gpu_model(*args).cpu(), cpu, atol=1e-4, rtol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            out = gpu_model(*args)
        assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------
# Heatmap scores
# ----------------------------------------------------------------------------------------------------------

def test_tile_attention_scores_projects_last_cls_through_kernel_to_patch():
    model = _small_model(14, depth=3).train()
    slides = [_grid_slide(5, 5, 3, 6, 1), _grid_slide(3, 4, 2, 6, 2)]
    feats, dist, tmask, kmask = _pad_batch(slides)
    scores = tile_attention_scores(model, feats, dist, tmask, kmask)
    assert model.training                                       # restored
    assert scores.shape == (2, 25)
    assert (scores[~tmask] == 0).all() and (scores >= 0).all()
    assert (scores.sum(1) <= 1 + 1e-6).all() and (scores[tmask] > 0).all()
    model.eval()
    _, attn = model(feats, dist, tmask, kmask, return_attention=True)
    alpha = attn["cls_to_kernel"][2].mean(1)
    manual = torch.einsum("bm,bmn->bn", alpha, attn["kernel_to_patch"][1].mean(1)) * tmask
    torch.testing.assert_close(scores, manual)
    as_batch = tile_attention_scores(model, {"features": feats, "anchor_dist": dist, "tile_mask": tmask,
                                             "kernel_mask": kmask})
    torch.testing.assert_close(as_batch, scores)
    # The first slide alone gives the same scores.
    alone = tile_attention_scores(model, slides[0][0][None], slides[0][1][None])
    torch.testing.assert_close(alone[0], scores[0], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------

def _official_like(seed=0, **kw):
    torch.manual_seed(seed)
    return _randomise(KernelAttentionTransformer(512, 4, **kw), seed=seed, std=0.05)


def _inputs(seed=0, p=512):
    f, d = _grid_slide(7, 8, 3, p, seed)
    return f[None], d[None]


def _katcl_state(sd):
    """KATCL layout (kat.md 5.6): online/target KAT plus BYOL projector / predictor heads."""
    out = {f"online_kat.{k}": v for k, v in sd.items()}
    out.update({f"target_kat.{k}": v + 1.0 for k, v in sd.items()})
    for head in ("online_projector", "target_projector", "predictor"):
        out.update({f"{head}.0.weight": torch.randn(1024, 256), f"{head}.1.weight": torch.ones(1024),
                    f"{head}.1.bias": torch.zeros(1024), f"{head}.4.weight": torch.randn(256, 1024),
                    f"{head}.4.bias": torch.zeros(256)})
    return out


@pytest.mark.parametrize("form", ["bare", "wrapped", "module", "katcl", "module_katcl"])
def test_load_official_checkpoint_forms(form):
    src = _official_like(1)
    sd = src.state_dict()
    obj = {
        "bare": lambda: dict(sd),
        "wrapped": lambda: {"epoch": 5, "state_dict": dict(sd), "optimizer": {"state": {}, "param_groups": []}},
        "module": lambda: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "katcl": lambda: {"state_dict": _katcl_state(sd)},
        "module_katcl": lambda: {"state_dict": {f"module.{k}": v for k, v in _katcl_state(sd).items()}},
    }[form]()
    model = load_official_checkpoint(obj)
    assert not model.training
    assert model.hparams["heads"] == 8 and model.hparams["dim_head"] == 64 and model.hparams["npk"] == 144
    f, d = _inputs()
    torch.testing.assert_close(model(f, d), src(f, d), atol=0, rtol=0)


def test_load_official_file_with_args_namespace(tmp_path):
    src = _official_like(2, heads=4, dim_head=128, npk=64)
    args = argparse.Namespace(trfm_dim=256, trfm_depth=4, trfm_heads=4, trfm_dim_head=128, trfm_mlp_dim=512,
                              trfm_pool="cls", npk=64, kn=65, max_nodes=4096, input_dim=512, num_classes=4,
                              task_list={0: {"num_classes": 4, "map": {"a": 0}}}, lr=1e-4)
    path = tmp_path / "model_200.pth.tar"
    torch.save({"epoch": 199, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()},
                "optimizer": {}, "args": args}, path)
    model = load_official_checkpoint(str(path))
    assert (model.hparams["heads"], model.hparams["dim_head"], model.hparams["npk"]) == (4, 128, 64)
    f, d = _inputs()
    torch.testing.assert_close(model(f, d), src(f, d), atol=0, rtol=0)
    assert model.checkpoint_info["saved_hparams"]["npk"] == 64
    # Without args, heads/npk fall back to the official defaults, which changes the function.
    bare = load_official_checkpoint(src.state_dict())
    assert bare.hparams["heads"] == 8 and not torch.allclose(bare(f, d), src(f, d))
    # An explicit argument wins over the saved args.
    assert load_official_checkpoint(path, npk=144).hparams["npk"] == 144


def test_load_checkpoint_from_object_store(s3_bucket):
    from her2ray import storage

    src = _official_like(3)
    path = pathlib.Path("/tmp") / f"kat_ckpt_{id(src)}.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    url = storage.join(s3_bucket, "ckpt", "model.pt")
    storage.write_bytes_atomic(url, path.read_bytes())
    path.unlink()
    model = load_official_checkpoint(url)
    f, d = _inputs()
    torch.testing.assert_close(model(f, d), src(f, d), atol=0, rtol=0)


def test_untrusted_pickle_needs_trusted_flag(tmp_path):
    src = _official_like(4)
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": src.state_dict(), "args": {"where": pathlib.PurePosixPath("/x")}}, path)
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_official_checkpoint(path)
    assert load_official_checkpoint(path, trusted=True).hparams["patch_dim"] == 512


def test_her2ray_checkpoint_and_shape_inference():
    src = _randomise(KernelAttentionTransformer(20, 3, dim=32, depth=2, heads=2, dim_head=8, mlp_dim=48, npk=36))
    saved = {"state_dict": src.state_dict(), "model_name": "kat", "hparams": dict(src.hparams),
             "patch_dim": 20, "num_classes": 3}
    model = load_official_checkpoint(saved)
    assert model.hparams == {**src.hparams}
    f, d = _grid_slide(5, 5, 2, 20, 0)
    torch.testing.assert_close(model(f[None], d[None]), src(f[None], d[None]), atol=0, rtol=0)
    # Shapes alone: dim, depth, mlp_dim, patch_dim, classes inferred; heads from an argument.
    inferred = load_official_checkpoint(src.state_dict(), heads=2, npk=36)
    assert {k: inferred.hparams[k] for k in ("dim", "depth", "mlp_dim", "patch_dim", "num_classes", "dim_head")} \
        == {"dim": 32, "depth": 2, "mlp_dim": 48, "patch_dim": 20, "num_classes": 3, "dim_head": 8}


def test_identity_to_out_layout_loads():
    src = _randomise(KernelAttentionTransformer(10, 2, dim=16, depth=2, heads=1, dim_head=16, mlp_dim=16))
    assert not any("to_out" in k for k in src.state_dict())
    model = load_official_checkpoint(src.state_dict())
    assert (model.hparams["heads"], model.hparams["dim_head"]) == (1, 16)
    with pytest.raises(ValueError, match="heads == 1"):
        KernelAttentionTransformer(10, 2, dim=16, heads=2, dim_head=16)


def test_mismatched_checkpoints_fail_with_key_names():
    sd = _official_like(5).state_dict()
    with pytest.raises(CheckpointError, match="patch_dim=256"):
        load_official_checkpoint(sd, patch_dim=256)
    with pytest.raises(CheckpointError, match="num_classes"):
        load_official_checkpoint(sd, num_classes=3)
    missing = {k: v for k, v in sd.items() if k != "kt.layers.2.2.norm.bias"}
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['kt.layers.2.2.norm.bias'\]"):
        load_official_checkpoint(missing)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['kt.layers.0.1.to_qkv.bias'\]"):
        load_official_checkpoint({**sd, "kt.layers.0.1.to_qkv.bias": torch.zeros(1536)})
    bad = dict(sd)
    bad["kt.layers.1.2.fn.net.3.weight"] = torch.zeros(256, 7)
    with pytest.raises(CheckpointError, match="kt.layers.1.2.fn.net.3.weight"):
        load_official_checkpoint(bad)
    with pytest.raises(CheckpointError, match="heads"):
        load_official_checkpoint(sd, heads=3)
    with pytest.raises(CheckpointError, match="not a KAT state_dict"):
        load_official_checkpoint({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="unknown KAT hyperparameter"):
        load_official_checkpoint(sd, depht=4)
    with pytest.raises(CheckpointError, match="not found"):
        load_official_checkpoint("/nonexistent/model.pth.tar")
