#!/usr/bin/env bash
# The GPU readiness check: one script, ≤ 8 minutes on one GPU (an H200: about 5).
#
#   (a) the engine, fused loss and one-pass support against their references on the device,
#       fp32 and bf16 (tests/unit/test_device_equality.py with GASTUNE_TEST_DEVICE);
#   (b) step_cost.py at the paper's setting: random-init LLaMA-7B shape, bf16, 16 × 256, for
#       peer, lora, gast (one pass), gast-batch, gast-twopass and ist, as ratios, memory = torch.cuda.max_memory_allocated;
#   (c) a 20-step train + eval through gastune's own entry points (benchmarks/gpu_train_eval.py:
#       the default model's architecture, random-init, on real commonsense records carried in
#       benchmarks/data — the GPU machine has no gguf, datasets or network).
#
# Usage (on the GPU machine, from the repository root; the project installed with
# `pip install --no-deps -e .` or PYTHONPATH=src, which this script sets):
#   benchmarks/gpu_check.sh                          # cuda, llama-7b, results in runs/gpu_check
#   benchmarks/gpu_check.sh --device cpu --shape tiny  # the CPU dry run (tests/unit/test_gpu_check.py)
# Then commit runs/gpu_check/step_cost_gpu.json as docs/results/step_cost_gpu.json and
#   python benchmarks/step_cost.py --render docs/results/step_cost_gpu.json --readme
set -euo pipefail

DEVICE=cuda
SHAPE=llama-7b
OUT=runs/gpu_check
TOKENIZER=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --shape) SHAPE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --tokenizer) TOKENIZER=$2; shift 2 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "[gpu_check $(( $(date +%s) - start ))s] $*"; }

if [[ "$SHAPE" == tiny ]]; then
    SIZE=(--batch 4 --seq 32 --k 2 --k-sup 2 --steps 1 --warmup 1)
    TRAIN=(--shape tiny --steps 4 --batch 4 --eval-records 16)
else
    SIZE=(--batch 16 --seq 256 --k 8 --k-sup 4 --steps 3 --warmup 1)
    TRAIN=(--shape smollm2-135m --steps 20 --batch 16)
fi
[[ -n "$TOKENIZER" ]] && TRAIN+=(--tokenizer "$TOKENIZER")

stamp "(a) engine vs reference on $DEVICE, fp32 and bf16"
GASTUNE_TEST_DEVICE=$DEVICE $PY -m pytest -q -p no:cacheprovider tests/unit/test_device_equality.py

stamp "(b) step cost: $SHAPE, bf16, ${SIZE[*]}"
$PY benchmarks/step_cost.py --device "$DEVICE" --shape "$SHAPE" --bf16 \
    --methods peer,lora,gast,gast-batch,gast-twopass,ist "${SIZE[@]}" --rounds 1 \
    --out "$OUT/step_cost_gpu.json"

stamp "(c) train + eval on $DEVICE"
$PY benchmarks/gpu_train_eval.py --device "$DEVICE" "${TRAIN[@]}" \
    --work "$OUT/train_eval" --out "$OUT/train_eval.json"

stamp "all checks passed; results in $OUT"
