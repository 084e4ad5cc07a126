#!/usr/bin/env bash
# GPU check: a few steps of each strategy on the random-weight llava-1.5-7b preset, one GPU, then `full`
# under DeepSpeed ZeRO-3 on every visible GPU when there are several. Prints samples/s and peak GPU memory.
# Run from the repository root with the runtime stack installed (torch, transformers, accelerate, peft, deepspeed,
# pyarrow, fsspec). Disk: ~45 GB at the peak (the 7B model, one exported 7B fine-tune and its temporary copy).
#   bash benchmarks/gpu_check.sh [ROOT]        (env: PY=python3 STEPS=4)
set -euo pipefail
ROOT=${1:-/tmp/mysproj-gpu-check}
PY=${PY:-python3}
STEPS=${STEPS:-4}
NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())')
MODEL=$ROOT/models/llava-1.5-7b
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -m mysproj.cli model init --preset llava-1.5-7b --out "$MODEL"
$PY -m mysproj.cli prep --dataset textures-mini --out "$ROOT/prep"
# textures-mini has 48 training images: enough epochs that even the 64-sample projector batch runs STEPS steps.
COMMON=(--model "$MODEL" --data "$ROOT/prep" --max-steps "$STEPS" --epochs 100 --log-every 1 --workers 4
        --no-save-checkpoints)

report() {
  $PY - "$1" "$2" <<'EOF'
import json, sys
s = json.load(open(sys.argv[2] + "/_SUCCESS.json"))["summary"]
keys = ("samples_per_s", "peak_gpu_memory_gib", "world_size", "deepspeed", "precision", "global_batch",
        "per_device_batch", "accumulation", "final_loss", "seconds")
print("GPU-CHECK", sys.argv[1], json.dumps({k: s.get(k) for k in keys}))
EOF
}

for strategy in projector lora full; do
  out=$ROOT/ft-$strategy
  $PY -m mysproj.cli finetune --strategy "$strategy" --out "$out" "${COMMON[@]}"
  report "$strategy-1gpu" "$out"
  rm -rf "$out"
done
if [ "$NGPU" -gt 1 ]; then
  out=$ROOT/ft-full-zero3
  torchrun --standalone --nproc-per-node "$NGPU" -m mysproj.cli finetune --strategy full --out "$out" "${COMMON[@]}"
  report "full-zero3-${NGPU}gpu" "$out"
  rm -rf "$out"
fi
