#!/usr/bin/env bash
# The prepared GPU benchmark (about 3-4 minutes on an H100/H200): ueo's step against the
# reference step for RN50 and ViT-B/16 at 345 and 65 classes (fp32 equality, bf16 speed,
# images/s, fraction of the card's bf16 matmul rate), then the throughput of whole epochs
# with a real loader for RN50 and ViT-B/16 in bf16, and whether the loader or the model bounds it.
#
# The lent GPU machines have PyTorch but not open_clip and reach no package registry, so the
# wheels travel with the working tree: run `make wheels` here first, then on the GPU machine
# `bash benchmarks/gpu.sh` (device tool: carry [".wheels"]). Results land in $OUT (or runs/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if ! "$PY" -c "import open_clip" 2>/dev/null; then
  if ! ls .wheels/*.whl >/dev/null 2>&1; then
    echo "open_clip is not installed and .wheels/ is empty: run 'make wheels' first" >&2
    exit 1
  fi
  "$PY" -m pip install --quiet --no-deps --target /tmp/ueo-deps .wheels/*.whl
  export PYTHONPATH=/tmp/ueo-deps
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 200 "$PY" benchmarks/step_speed.py --device cuda --precision bf16 --steps 5 \
  --out "$OUT/step_speed.jsonl"
# Whole epochs with the real loader (12 workers sharing one store of decoded images), bf16: one
# JSON line per model with the loader's rate (decoding, then from the store), the model's, the
# first epoch's (it decodes) and the later epochs' (they must decode nothing), and the bound.
: > "$OUT/epoch_speed.jsonl"
for model in RN50 ViT-B-16; do
  timeout 120 "$PY" benchmarks/epoch_speed.py --model "$model" --device cuda --precision bf16 \
    --images 2000 --batch 64 --workers 12 --folder /tmp/ueo-epoch-images --json \
    | tee -a "$OUT/epoch_speed.jsonl"
done
"$PY" - "$OUT/epoch_speed.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['model']} bf16 epochs after the first {r['epoch_images_per_s']} img/s = "
          f"{r['epoch_vs_model']:.0%} of the model's {r['model_images_per_s']} (first epoch "
          f"{r['first_epoch_images_per_s']}); loader {r['loader_images_per_s']} img/s "
          f"({r['loader_cold_images_per_s']} decoding); decodes per epoch "
          f"{r['decodes_per_epoch']}; device finish exact: {r['finish_exact']}; "
          f"bound by the {r['bound_by']}")
PYEOF
