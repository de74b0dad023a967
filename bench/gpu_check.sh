#!/usr/bin/env bash
# The CUDA path end to end and the benchmarks, in one run of under ten minutes on one lent GPU.
# Prepare here first: bash bench/gpu_prepare.sh; then run there with .gpu carried:
#     bash bench/gpu_check.sh            (results: JSON lines in $OUT, or bench/out/ without $OUT)
# GPU_CHECK_STEPS (training steps, default 20), GPU_CHECK_BENCH_STEPS (measured overhead steps, 6),
# GPU_CHECK_PRECISION (bf16): small values and fp32 make it a smoke test on a CPU machine
# (tests/test_bench.py runs it so, with GPU_CHECK_ARGS for shorter sequences and GPU_CHECK_PROBLEMS
# for fewer OT problems). GPU_CHECK_ASSETS, GPU_CHECK_MODEL, GPU_CHECK_RUN_DIR: where things are.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/out}"
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STEPS="${GPU_CHECK_STEPS:-20}"
BENCH_STEPS="${GPU_CHECK_BENCH_STEPS:-6}"
PRECISION="${GPU_CHECK_PRECISION:-bf16}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import deepspeed, ot, datasets' 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ASSETS="${GPU_CHECK_ASSETS:-.gpu/assets}"
MODEL="${GPU_CHECK_MODEL:-/tmp/smollm2-shaped}"
RUN_DIR="${GPU_CHECK_RUN_DIR:-/tmp/gpu_run}"
"$PYTHON" bench/gpu_assets.py unpack "$ASSETS" "$MODEL"
DATA="$ASSETS/champ.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/device.txt" || true
"$PYTHON" -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)' | tee -a "$RESULTS/device.txt"

read -r -a EXTRA <<< "${GPU_CHECK_ARGS:-}"   # more overrides, e.g. shorter sequences for a CPU smoke test
COMMON=(--model.name_or_path "$MODEL" --data.source "$DATA" --data.eval_size 8 --train.precision "$PRECISION"
        "${EXTRA[@]}")

echo "== 1. training end to end: ZeRO-3, ${PRECISION}, DPO + PLOT, ${STEPS} steps"
timeout 240 "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 launch/train.py "${COMMON[@]}" \
    --train.max_steps "$STEPS" --train.eval_every 0 --train.output_dir "$RUN_DIR" --train.resume none 2>&1 \
    | tee "$RESULTS/train.log" | grep -E "^\[plot_ds\]|Error|error" || true
tail -n 1 "$RUN_DIR/train_history.jsonl" | tee "$RESULTS/train_last_step.json"

echo "== 2. PLOT overhead (one GPU: the slice bytes need two ranks, see docs/benchmarks.md)"
timeout 150 "$PYTHON" bench/plot_overhead.py --steps "$BENCH_STEPS" --warmup 1 "${COMMON[@]}" 2>/dev/null \
    | tail -n 1 | tee "$RESULTS/plot_overhead.json"

echo "== 3. batched Sinkhorn on the GPU vs a loop over POT's ot.emd2"
timeout 120 "$PYTHON" bench/sinkhorn_vs_pot.py --model "$MODEL" --problems "${GPU_CHECK_PROBLEMS:-1024}" --repeats 3 2>/dev/null \
    | tail -n 1 | tee "$RESULTS/sinkhorn_vs_pot.json"

echo "== done; results in $RESULTS"
