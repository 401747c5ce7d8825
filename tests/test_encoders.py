"""The PLIP encoder against the reference implementation (transformers CLIPModel) on the same weights.

PLIP's weights cannot be downloaded here, so a random CLIPModel with PLIP's exact vision config (and a small
text tower, unused for tiles) stands in; every parameter is perturbed so that a wrong key mapping (q/k/v
order, missing transpose, swapped LayerNorms) shows up as an O(1) difference.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from her2ray.encoders import CLIP_MEAN, CLIP_STD, PLIP_ARCH, load_encoder, write_open_clip_dir
from her2ray.encoders import convert
from her2ray.errors import ConfigError

PLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=77, vocab_size=1000, hidden_act="quick_gelu",
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def hf_plip(tmp_path_factory):
    """(CLIPModel with PLIP's vision config and perturbed random weights, its save_pretrained folder)."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(projection_dim=512, vision_config=PLIP_VISION, text_config=SMALL_TEXT)
    torch.manual_seed(1234)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.01))
    folder = tmp_path_factory.mktemp("plip_hf")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def plip_encoder(hf_plip):
    """The folder above loaded once through load_encoder (shared: loading is the slow part on 2 cores)."""
    return load_encoder("plip", str(hf_plip[1]), device="cpu")


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(0)
    return torch.randn(3, 3, 224, 224)


def _reference(model, pixels) -> torch.Tensor:
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    return out if torch.is_tensor(out) else out.pooler_output


def test_plip_from_transformers_folder_matches_get_image_features(hf_plip, plip_encoder, pixels):
    model, folder = hf_plip
    enc = plip_encoder
    with torch.no_grad():
        ours = enc(pixels)
    ref = _reference(model, pixels)
    assert ours.shape == (3, 512)
    assert (ours - ref).abs().max().item() <= 1e-4
    ident = enc.identity
    assert ident["name"] == "plip" and ident["architecture"] == PLIP_ARCH and ident["dim"] == 512
    assert ident["random_weights"] is False and ident["weights_format"] == "transformers"
    assert ident["weights_sha256"] == _sha(os.path.join(folder, "model.safetensors"))
    assert enc.precision == "fp32" and enc.device.type == "cpu"


def test_same_weights_in_exact_gelu_vit_are_silently_wrong(hf_plip, pixels):
    """The pitfall the QuickGELU check exists for: strict load into plain ViT-B-32 works but differs."""
    import open_clip
    from open_clip.model import _build_vision_tower

    model, folder = hf_plip
    state = convert.hf_clip_to_open_clip_visual(model.state_dict())
    cfg = open_clip.get_model_config("ViT-B-32")
    assert not cfg.get("quick_gelu")
    gelu_tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=False).eval()
    gelu_tower.load_state_dict(state, strict=True)          # no error: that is the danger
    with torch.no_grad():
        wrong = gelu_tower(pixels)
    assert (wrong - _reference(model, pixels)).abs().max().item() > 1e-3
    # and load_encoder refuses to put PLIP weights into the GELU architecture
    with pytest.raises(ConfigError, match="ViT-B-32-quickgelu"):
        load_encoder("open_clip:ViT-B-32", str(folder), device="cpu")


def test_open_clip_folder_and_bare_files_load_identically(hf_plip, pixels, tmp_path):
    model, folder = hf_plip
    ref = _reference(model, pixels)
    visual_state = convert.hf_clip_to_open_clip_visual(model.state_dict())
    oc_dir = write_open_clip_dir(visual_state, open_clip_cfg(), str(tmp_path / "oc"))
    for name in ("plip", "open_clip"):
        enc = load_encoder(name, oc_dir, device="cpu")
        with torch.no_grad():
            assert (enc(pixels) - ref).abs().max().item() <= 1e-4
        assert enc.identity["architecture"] == PLIP_ARCH
        assert enc.identity["weights_format"] == "open_clip"
    # a bare transformers state dict (.bin) needs the name to give the architecture
    bare = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), bare)
    enc = load_encoder("plip", str(bare), device="cpu")
    with torch.no_grad():
        assert (enc(pixels) - ref).abs().max().item() <= 1e-4
    assert enc.identity["weights_sha256"] == _sha(bare)
    with pytest.raises(ConfigError, match="architecture"):
        load_encoder("open_clip", str(bare), device="cpu")


def open_clip_cfg() -> dict:
    import open_clip

    return open_clip.get_model_config(PLIP_ARCH)


def test_identity_sha_is_stable_and_random_init_is_labelled(hf_plip, plip_encoder):
    _, folder = hf_plip
    a = plip_encoder.identity
    b = load_encoder("plip", str(folder), device="cpu").identity
    assert a["weights_sha256"] == b["weights_sha256"]

    r1 = load_encoder("plip", None, device="cpu")
    r2 = load_encoder("plip", "random", device="cpu")
    r3 = load_encoder("plip", None, device="cpu", seed=1)
    assert r1.identity["random_weights"] is True and r1.random_weights
    assert r1.identity["source"].startswith("random-init")
    assert r1.identity["weights_sha256"] == r2.identity["weights_sha256"] != r3.identity["weights_sha256"]
    assert r1.identity["weights_sha256"] != a["weights_sha256"]
    tiles = np.random.default_rng(0).integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(r1.embed_tiles(tiles), r2.embed_tiles(tiles))
    settings = r1.settings_identity()
    assert settings["random_weights"] is True and "precision" not in settings and "source" not in settings


def test_preprocess_uint8_tiles_resizes_256_to_224_and_normalises(hf_plip, plip_encoder):
    model, _ = hf_plip
    enc = plip_encoder
    tiles = np.random.default_rng(3).integers(0, 256, size=(5, 256, 256, 3), dtype=np.uint8)
    x = enc.preprocess(tiles)
    assert x.shape == (5, 3, 224, 224) and x.dtype == torch.float32
    manual = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    manual = F.interpolate(manual, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    manual = (manual - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, manual)
    # embed_tiles = reference model on our preprocessing, independent of batch splitting
    emb = enc.embed_tiles(tiles, batch_size=2)
    assert emb.dtype == np.float32 and emb.shape == (5, 512)
    np.testing.assert_allclose(emb, _reference(model, manual).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(emb, enc.embed_tiles(torch.from_numpy(tiles)), atol=1e-5, rtol=0)
    assert enc.embed_tiles(tiles[:0]).shape == (0, 512)
    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess(tiles.astype(np.float32))


def test_bf16_autocast_is_close_to_fp32(tmp_path):
    """Reduced precision (the GPU default) stays close to fp32; checked on a small tower to keep CPU time low."""
    cfg = {"embed_dim": 64, "quick_gelu": True,
           "vision_cfg": {"image_size": 224, "layers": 3, "width": 128, "patch_size": 32}}
    folder = write_open_clip_dir(_tiny_state(cfg), cfg, str(tmp_path / "small"))
    tiles = np.random.default_rng(5).integers(0, 256, size=(4, 256, 256, 3), dtype=np.uint8)
    ref = load_encoder("open_clip", folder, device="cpu").embed_tiles(tiles)
    for precision in ("bf16", "bf16-pure"):
        low = load_encoder("open_clip", folder, device="cpu", precision=precision).embed_tiles(tiles)
        cos = (low * ref).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.999, precision
    with pytest.raises(ValueError, match="precision"):
        load_encoder("open_clip", folder, device="cpu", precision="int8")


def test_other_open_clip_architectures_and_tiny_custom_towers(tmp_path):
    enc = load_encoder("open_clip:ViT-B-16", None, device="cpu")
    assert enc.identity["architecture"] == "ViT-B-16" and enc.dim == 512 and enc.input_size == 224
    tiny_cfg = {"embed_dim": 32, "quick_gelu": True,
                "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32}}
    folder = write_open_clip_dir(_tiny_state(tiny_cfg), tiny_cfg, str(tmp_path / "tiny"))
    tiny = load_encoder("open_clip", folder, device="cpu")
    assert tiny.identity["architecture"].startswith("custom-") and tiny.dim == 32
    out = tiny.embed_tiles(np.zeros((3, 256, 256, 3), dtype=np.uint8))
    assert out.shape == (3, 32) and np.isfinite(out).all()


def _tiny_state(model_cfg):
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu=True).state_dict()


def test_bad_names_and_weights_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="unknown encoder"):
        load_encoder("resnet50")
    with pytest.raises(ConfigError, match="no architecture"):
        load_encoder("open_clip:NoSuchNet")
    with pytest.raises(ConfigError, match="no such file"):
        load_encoder("plip", str(tmp_path / "missing.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not an encoder folder"):
        load_encoder("plip", str(tmp_path / "empty"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        load_encoder("plip", str(tmp_path / "junk.bin"))
    with pytest.raises(ConfigError, match="needs --weights"):
        load_encoder("open_clip", None)


def test_hub_id_offline_gives_actionable_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="hub"):
        load_encoder("plip", "vinid/plip-not-cached-here", device="cpu")
