#!/usr/bin/env bash
# The prepared GPU benchmark, in one go (about 4-5 minutes on an H100/H200), printing one table:
#   1. the training step, RN50 and ViT-B/16 at 345 and 65 classes, batch 64: the reference step
#      against ueo's step in fp32 (equal numbers) and bf16 (speed), images/s and the share of the
#      card's bf16 matmul rate; a torch.profiler table per case;
#   2. whole epochs with the real loader for RN50 and ViT-B/16 in bf16 (what bounds an epoch);
#   3. `ueo adapt` end to end on the same JPEGs (where its wall time goes: metrics.json timings_s);
#   4. the BatchNorm lead not taken: the step with the frozen affine form against PyTorch's own;
#   5. RN50 at 65 classes again, also compiled (last: compiling takes longest).
# A part that fails or runs out of time is noted in $OUT/failures.txt and the others go on; every
# part writes its results as it ends, so a cut run still leaves them (gpu_table.py reads them).
#
# The lent GPU machines have PyTorch but not open_clip and reach no package registry, so the
# wheels travel with the working tree: run `make wheels` here first, then on the GPU machine
# `bash benchmarks/gpu.sh` (device tool: carry [".wheels"]). Results land in $OUT (or runs/gpu).
# A dry run of the script on a CPU, with a bundled tiny model: DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
: > "$OUT/failures.txt"
failed() { echo "gpu.sh: $1 failed or ran out of time; going on" | tee -a "$OUT/failures.txt" >&2; }
if ! "$PY" -c "import open_clip" 2>/dev/null; then
  if ! ls .wheels/*.whl >/dev/null 2>&1; then
    echo "open_clip is not installed and .wheels/ is empty: run 'make wheels' first" >&2
    exit 1
  fi
  "$PY" -m pip install --quiet --no-deps --target /tmp/ueo-deps .wheels/*.whl
  export PYTHONPATH=/tmp/ueo-deps
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "${QUICK:-0}" = 1 ]; then  # a dry run: tiny models, few images
  CASES="ueo-tiny-rn:65 ueo-tiny-vit:65"; COMPILED=""; MODELS="ueo-tiny-rn"; RESNET=ueo-tiny-rn
  IMAGES=48; WORKERS=1; BATCH=16; STEPS=4
else
  CASES="RN50:345 RN50:65 ViT-B-16:345 ViT-B-16:65"; COMPILED="RN50:65"; MODELS="RN50 ViT-B-16"
  RESNET=RN50
  IMAGES=2000; WORKERS=12; BATCH=64; STEPS=10
fi
{
  if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/gpu.txt"

# 1. The step.
step() {  # model:classes [--compile]
  local model=${1%%:*} classes=${1##*:}
  timeout 240 "$PY" benchmarks/step_speed.py --model "$model" --classes "$classes" \
    --device "$DEVICE" --batch "$BATCH" --precision bf16 --steps "$STEPS" \
    --profile "$OUT/profiles" --json "${@:2}" | tee -a "$OUT/step_speed.jsonl" \
    || failed "step_speed.py $*"
}
: > "$OUT/step_speed.jsonl"
for case in $CASES; do step "$case"; done

# 2. Whole epochs with the real loader (JPEG decoding and augmentation in worker processes).
: > "$OUT/epoch_speed.jsonl"
for model in $MODELS; do
  timeout 150 "$PY" benchmarks/epoch_speed.py --model "$model" --device "$DEVICE" \
    --precision bf16 --images "$IMAGES" --batch "$BATCH" --workers "$WORKERS" \
    --folder /tmp/ueo-epoch-images --json | tee -a "$OUT/epoch_speed.jsonl" \
    || failed "epoch_speed.py --model $model"
done

# 3. `ueo adapt` end to end on those JPEGs (random-init RN50, 345 classes, 2 epochs, bf16).
model=${MODELS%% *}
rm -rf "$OUT/adapt"
timeout 200 "$PY" -m ueo adapt --model "$model" \
  --pretrained "$([ "${QUICK:-0}" = 1 ] && echo bundled || echo none)" \
  --data /tmp/ueo-epoch-images --classes src/ueo/bench/classes/domainnet.classes.txt \
  --epochs 2 --batch-size "$BATCH" --precision bf16 --device "$DEVICE" --workers "$WORKERS" \
  --out "$OUT/adapt" --quiet > "$OUT/adapt.txt" 2>&1 || { cat "$OUT/adapt.txt"; failed "ueo adapt"; }

# 4. BatchNorm in the frozen affine form against PyTorch's own (ueo's step, RN50, 65 classes).
timeout 120 "$PY" benchmarks/frozen_norm.py --model "$RESNET" --classes 65 --device "$DEVICE" \
  --precision bf16 --batch "$BATCH" --steps "$STEPS" --profile "$OUT/profiles" --json \
  > "$OUT/frozen_norm.json" || failed "frozen_norm.py"

# 5. The compiled step.
for case in $COMPILED; do step "$case" --compile; done

"$PY" benchmarks/gpu_table.py "$OUT" | tee "$OUT/table.md"
