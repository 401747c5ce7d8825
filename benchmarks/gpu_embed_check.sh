#!/usr/bin/env bash
# GPU check of the embedding engine (no Ray needed), < 5 min on one H100/H200. Run from the repo root:
#
#   bash benchmarks/gpu_embed_check.sh            # on the GPU machine; wheels (if any) in .whl/
#   SKIP_WHEELS=1 DEVICE=cpu CHECK_SLIDE_PX=1536 SYNTH_PX=4096 REPEAT=1 TOWER_BATCH=16 \
#     bash benchmarks/gpu_embed_check.sh                                        # CPU dry run of the logic
#
# 1. installs the wheels carried in .whl/ (open_clip_torch, ftfy, wcwidth, openslide-python, openslide-bin,
#    imagecodecs, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions) into /tmp/site;
# 2. correctness on the device: PLIP conversion == transformers CLIPModel (fp32, <= 1e-4); bf16/fp16 (autocast
#    and pure) close to fp32; CUDA fp32 vs CPU fp32; embed_slide on a synthetic slide on the device == CPU;
# 3. PLIP tower images/s at batch 1024 (bf16, fp16, pure, fp32) and end-to-end tiles/s of her2ray's engine vs
#    a CLAM-style DataLoader baseline on one big synthetic slide generated here (benchmarks/embed_throughput.py).
# Prints PASS/FAIL lines; exit status 1 if any check failed. Numbers also go to $OUT/embed_throughput.json.
set -uo pipefail
START=$(date +%s)
DEVICE=${DEVICE:-cuda}
SYNTH_PX=${SYNTH_PX:-20480}
REPEAT=${REPEAT:-3}
TOWER_BATCH=${TOWER_BATCH:-1024}
CHECK_SLIDE_PX=${CHECK_SLIDE_PX:-4096}
WORKERS=${WORKERS:-$(python3 -c "import os; print(min(16, len(os.sched_getaffinity(0))))")}
RESULTS=${OUT:-/tmp}
cd "$(dirname "$0")/.."

source benchmarks/device_env.sh || exit 1
export DEVICE CHECK_SLIDE_PX
python3 - <<'EOF' || { echo "FAIL imports"; exit 1; }
import importlib
for m in ("torch", "torchvision", "open_clip", "openslide", "pydantic", "imagecodecs", "tifffile", "pyarrow",
          "skimage", "timm", "transformers"):
    mod = importlib.import_module(m)
    print(f"{m:12s} {getattr(mod, '__version__', '?')}")
import torch; print("cuda available:", torch.cuda.is_available())
EOF
echo "setup done at $(( $(date +%s) - START )) s"

rm -f "${TMPDIR:-/tmp}/her2ray_gpu_check_failures"
python3 - <<'EOF'
"""Correctness checks on the device."""
import os, sys, tempfile, time
import numpy as np
import torch

from her2ray.encoders import load_encoder
from her2ray.features.embed import EmbedConfig, embed_slide
from her2ray.features.schema import feature_url, read_slide_features
from her2ray.slides import open_slide
from her2ray.synth import write_synthetic_slide
from her2ray.tiling import TilingConfig, plan_tiles, read_tiles

dev = os.environ["DEVICE"]
failures = []

def check(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)

def cos_min(a, b):
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())

tmp = tempfile.mkdtemp()
t0 = time.time()
# 1) PLIP conversion on the device: transformers CLIPModel (PLIP config, perturbed random weights) vs load_encoder
try:
    from transformers import CLIPConfig, CLIPModel
    cfg = CLIPConfig(projection_dim=512, vision_config=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5), text_config=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    torch.manual_seed(0)
    hf = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.01))
    hf.save_pretrained(os.path.join(tmp, "plip_hf"))
    torch.backends.cudnn.allow_tf32 = False          # exact fp32 for this comparison only
    torch.backends.cuda.matmul.allow_tf32 = False
    enc = load_encoder("plip", os.path.join(tmp, "plip_hf"), device=dev, precision="fp32")
    x = torch.randn(16, 3, 224, 224)
    with torch.no_grad():
        ref = hf.to(dev).get_image_features(pixel_values=x.to(dev))
        ref = ref if torch.is_tensor(ref) else ref.pooler_output
        ours = enc(x.to(dev))
    d = (ours - ref).abs().max().item()
    check("plip-conversion-fp32", d <= 1e-4, f"max |ours - CLIPModel.get_image_features| = {d:.2e} on {dev}")
    torch.backends.cudnn.allow_tf32 = True
    del hf, enc
except Exception as exc:  # noqa: BLE001
    check("plip-conversion-fp32", False, f"{type(exc).__name__}: {exc}")

# 2) precisions on real-looking tiles from a synthetic slide
px = int(os.environ["CHECK_SLIDE_PX"])
slide = write_synthetic_slide(os.path.join(tmp, "syn.tiff"), px, px, seed=5, label=2)
with open_slide(slide) as r:
    grid = plan_tiles(r, TilingConfig(), keep_mask=False)
    tiles = read_tiles(r, grid, np.arange(min(256, len(grid))))
print(f"synthetic slide: {len(grid)} tiles; checks use {len(tiles)}", flush=True)
cpu32 = load_encoder("plip", None, device="cpu", precision="fp32").embed_tiles(tiles[:32])
dev32 = load_encoder("plip", None, device=dev, precision="fp32").embed_tiles(tiles)
d = float(np.abs(dev32[:32] - cpu32).max())
check(f"{dev}-fp32-vs-cpu-fp32", d < 2e-2 and cos_min(dev32[:32], cpu32) > 0.9999,
      f"max abs diff {d:.2e}, min cosine {cos_min(dev32[:32], cpu32):.6f} (TF32 convs allowed)")
for p in ("bf16", "fp16", "bf16-pure", "fp16-pure"):
    if dev == "cpu" and p.startswith("fp16"):
        continue
    low = load_encoder("plip", None, device=dev, precision=p).embed_tiles(tiles)
    c, d = cos_min(low, dev32), float(np.abs(low - dev32).max())
    check(f"{p}-vs-fp32", c > 0.999 and np.isfinite(low).all(), f"min cosine {c:.6f}, max abs diff {d:.3f}")

# 3) the engine on the device writes the same features as the CPU engine (within bf16 + float16 storage)
cfg_dev = EmbedConfig(device=dev)
enc_dev = load_encoder("plip", None, device=dev)
st = embed_slide({"slide_id": "syn", "path": slide}, enc_dev, cfg_dev, os.path.join(tmp, "store"))
check("embed_slide-on-device", st["status"] == "ok" and st["n_tiles"] == len(grid),
      f"{st['status']} {st['n_tiles']} tiles in {st['seconds']:.2f} s (wait {st['read_wait_s']:.2f} s, "
      f"encode {st['encode_s']:.2f} s, precision {enc_dev.precision}) {st['error'] or ''}")
if st["status"] == "ok":
    sf = read_slide_features(feature_url(os.path.join(tmp, "store"), "syn"))
    c = cos_min(sf.features[:32], cpu32)
    check("device-features-vs-cpu-fp32", c > 0.995, f"min cosine over 32 tiles {c:.5f}")
print(f"checks took {time.time() - t0:.1f} s; {len(failures)} failed: {failures}", flush=True)
open(os.path.join(tempfile.gettempdir(), "her2ray_gpu_check_failures"), "w").write(",".join(failures))
EOF
echo "checks done at $(( $(date +%s) - START )) s"

TOWER=${TOWER:-bf16,fp16,bf16-pure,fp16-pure,fp32}
[ "$DEVICE" = "cpu" ] && TOWER="fp32,bf16-pure"
python3 benchmarks/embed_throughput.py --device "$DEVICE" --tower "$TOWER" --tower-batch "$TOWER_BATCH" \
  --synth 1 --synth-px "$SYNTH_PX" --repeat "$REPEAT" --read-workers "$WORKERS" --baseline-workers "$WORKERS" \
  --baseline-batch 256 --json "$RESULTS/embed_throughput.json" || BENCH_FAILED=throughput-benchmark
echo "total $(( $(date +%s) - START )) s"
FAILED=$(cat "${TMPDIR:-/tmp}/her2ray_gpu_check_failures" 2>/dev/null || echo "checks-did-not-run")
FAILED=${FAILED}${BENCH_FAILED:+ ${BENCH_FAILED}}
[ -z "$FAILED" ] || { echo "FAILED checks: $FAILED"; exit 1; }
echo "ALL CHECKS PASSED"
