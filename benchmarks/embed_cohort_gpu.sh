#!/usr/bin/env bash
# GPU run of the cohort embedding benchmark (issue 11), one script, ~8-10 min on one H200 + 16 cores.
# From the repo root of a checkout that carries .whl/. Build it here (PyPI needed) with
#
#   bash ../shared/tools/device-wheels.sh && python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --platform manylinux2014_x86_64 -d .whl "simplejpeg>=1.8"     # scaled transport
#
#   bash benchmarks/embed_cohort_gpu.sh                     # on the GPU machine
#   SKIP_WHEELS=1 N_SLIDES=6 PX_40X=4096 PX_20X=3072 BIG=0 STAND_IN=1 bash benchmarks/embed_cohort_gpu.sh  # CPU dry run
#
# 1. installs the carried wheels (slim Ray 2.60, open_clip, openslide, imagecodecs, ...) into /tmp/site;
# 2. --check: on the device, pipelined routes vs the reference engine (OpenSlide + CPU resize) on a synthetic
#    40x slide (DCT-scaled reads; nvJPEG decode + device assembly/downscale) and the real SVS (native; read at
#    exactly 2x), if ../shared/data is there: same coordinates, min cosine per tile; the nvJPEG self-test
#    (YCbCr and Adobe-RGB JPEGs vs libjpeg-turbo);
# 3. the cohort benchmark with Ray: N_SLIDES rows, half 40x (0.25 um/px, 1/4/16 pyramid) and half 20x, BIG rows
#    of each kind on a > 20k-tissue-tile slide; PLIP (random weights, bf16) unless STAND_IN=1; ENGINES (default:
#    pipelined with the auto transport = DCT-scaled 40x reads + nvJPEG for native tiles, pipelined with every
#    tile through nvJPEG, and the reference engine) in the same run: steady-state tiles/s, encoder idle share,
#    seconds per stage.
# JSON: $OUT/embed_cohort_gpu.json and benchmarks/results/embed_cohort_gpu.json. Exit 1 when a step failed or a
# check is out of bounds (coords differ, min cosine < 0.9999).
set -uo pipefail
START=$(date +%s)
N_SLIDES=${N_SLIDES:-40}
FILES=${FILES:-3}
PX_40X=${PX_40X:-32768}
PX_20X=${PX_20X:-16384}
BIG=${BIG:-2}
BIG_PX_40X=${BIG_PX_40X:-131072}
BIG_PX_20X=${BIG_PX_20X:-57344}
ENGINES=${ENGINES:-pipelined,pipelined:jpeg,slide}
RESULTS=${OUT:-/tmp}
cd "$(dirname "$0")/.."

source benchmarks/device_env.sh || exit 1
python3 -c "import simplejpeg" || echo "WARN simplejpeg missing: no scaled transport (40x tiles go through nvJPEG)"
python3 -c "import torch, torchvision, ray, open_clip, openslide; print('torch', torch.__version__, 'tv', torchvision.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())" \
  || { echo "FAIL imports"; exit 1; }
echo "setup done at $(( $(date +%s) - START )) s"

EXTRA=()
[ -n "${STAND_IN:-}" ] && EXTRA+=(--stand-in)
mkdir -p benchmarks/results
python3 benchmarks/embed_cohort.py --check --n-slides "$N_SLIDES" --files-per-kind "$FILES" --px-40x "$PX_40X" \
  --px-20x "$PX_20X" --big "$BIG" --big-px-40x "$BIG_PX_40X" --big-px-20x "$BIG_PX_20X" "${EXTRA[@]}" \
  --engines "$ENGINES" \
  --json "$RESULTS/embed_cohort_gpu.json"
RC=$?
cp "$RESULTS/embed_cohort_gpu.json" benchmarks/results/embed_cohort_gpu.json 2>/dev/null
python3 - "$RESULTS/embed_cohort_gpu.json" <<'EOF' || RC=1
import json, sys
r = json.load(open(sys.argv[1]))
bad = [k for k, v in r.get("check", {}).items()
       if isinstance(v, dict) and "min_cosine" in v and (not v["coords_equal"] or v["min_cosine"] < 0.9999)]
print("check:", "FAIL " + ", ".join(bad) if bad else "PASS", {k: v for k, v in r.get("check", {}).items()
                                                             if k == "decoder_selftest"})
sys.exit(1 if bad else 0)
EOF
echo "total $(( $(date +%s) - START )) s"
[ "$RC" = 0 ] && echo "ALL CHECKS PASSED" || { echo "FAILED (rc $RC)"; exit 1; }
