#!/usr/bin/env bash
# The CUDA path end to end and the benchmarks, in one run of under ten minutes on one lent GPU.
# Prepare here first: bash bench/gpu_prepare.sh; then run there with .gpu carried:
#     bash bench/gpu_check.sh            (results: $OUT or bench/out/: results.jsonl, one JSON line per
#                                         benchmark; train.log, bench.log, device.txt, train_last_step.json,
#                                         profile.txt)
# GPU_CHECK_STEPS (training steps, default 10), GPU_CHECK_BENCH_STEPS (measured overhead steps, 6),
# GPU_CHECK_PRECISION (bf16): small values and fp32 make it a smoke test on a CPU machine
# (tests/test_bench.py runs it so, with GPU_CHECK_ARGS for shorter sequences, GPU_CHECK_PROBLEMS
# for fewer OT problems, GPU_CHECK_TRL_STEPS and GPU_CHECK_TRL_ARGS for a shorter TRL comparison).
# GPU_CHECK_PACKING_ARGS: bench/packing.py's arguments for a shorter run. GPU_CHECK_SHAPE=tiny: a
# model of SmolLM2's family and vocabulary but a few narrow layers (the CPU smoke test).
# GPU_CHECK_HEAD_POSITIONS (12288): response positions of the tiled-head section.
# GPU_CHECK_PLAN_CONFIGS: the memory plan's configurations to measure (none: skip the section).
# GPU_CHECK_ASSETS, GPU_CHECK_MODEL, GPU_CHECK_RUN_DIR, GPU_CHECK_WHEELS: where things are.
# Each section has its own time limit and a failed one does not stop the next: one lease, all results.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
RESULTS="${OUT:-bench/out}"
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STEPS="${GPU_CHECK_STEPS:-10}"
BENCH_STEPS="${GPU_CHECK_BENCH_STEPS:-6}"
PRECISION="${GPU_CHECK_PRECISION:-bf16}"
TRL_STEPS="${GPU_CHECK_TRL_STEPS:-10}"
PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-.gpu/wheels}"
JSONL="$RESULTS/results.jsonl"
BENCH_LOG="$RESULTS/bench.log"
: > "$JSONL"
: > "$BENCH_LOG"

# The wheels shadow the image's packages (its transformers is older than the one tested here).
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ASSETS="${GPU_CHECK_ASSETS:-.gpu/assets}"
MODEL="${GPU_CHECK_MODEL:-/tmp/smollm2-shaped}"
RUN_DIR="${GPU_CHECK_RUN_DIR:-/tmp/gpu_run}"
"$PYTHON" bench/gpu_assets.py unpack "$ASSETS" "$MODEL" --shape "${GPU_CHECK_SHAPE:-real}" || exit 1
DATA="$ASSETS/champ.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/device.txt"
"$PYTHON" -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())' | tee -a "$RESULTS/device.txt"
DEVICE="$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"

read -r -a EXTRA <<< "${GPU_CHECK_ARGS:-}"   # more overrides, e.g. shorter sequences for a CPU smoke test
COMMON=(--model.name_or_path "$MODEL" --data.source "$DATA" --data.eval_size 8 --train.precision "$PRECISION"
        "${EXTRA[@]}")
FAILED=()

# took START: how long a section ran (a lease is short: the log says where its time went).
took() {
    echo "   (took $((SECONDS - $1)) s)"
}

# bench NAME LIMIT_S COMMAND...: the command's last stdout line (its JSON) goes to results.jsonl.
bench() {
    local name="$1" limit="$2" started=$SECONDS
    shift 2
    echo "== $name"
    echo "== $name" >> "$BENCH_LOG"
    local line
    line="$(timeout "$limit" "$@" 2>>"$BENCH_LOG" | tail -n 1)"
    if [[ "$line" == "{"* ]]; then
        echo "$line" | tee -a "$JSONL"
    else
        echo "FAILED (see bench.log): $line"
        FAILED+=("$name")
    fi
    took "$started"
}

echo "== training end to end: ZeRO-3, ${PRECISION}, DPO + PLOT, ${STEPS} steps"
started=$SECONDS
if timeout 240 "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 launch/train.py "${COMMON[@]}" \
        --deepspeed.config ds_configs/zero3.json --train.max_steps "$STEPS" --train.eval_every 0 --train.output_dir "$RUN_DIR" --train.resume none \
        > "$RESULTS/train.log" 2>&1; then
    grep -E "^\[plot_ds\]" "$RESULTS/train.log" | tail -n 5
    tail -n 1 "$RUN_DIR/train_history.jsonl" | tee "$RESULTS/train_last_step.json"
else
    echo "FAILED (see train.log):"
    tail -n 30 "$RESULTS/train.log"
    FAILED+=("training")
fi
took "$started"

read -r -a TRL_EXTRA <<< "${GPU_CHECK_TRL_ARGS:-}"   # e.g. "--max-length 48 --warmup 0"
TRL=(--model "$MODEL" --pairs "$DATA" --device "$DEVICE" --steps "$TRL_STEPS" --warmup 3 --threads 0)
HAS_TRL="$("$PYTHON" -c 'import trl' 2>/dev/null && echo yes)"
if [[ -n "$HAS_TRL" ]]; then
    bench "plot_ds (default: ZeRO-2 on one rank, prompt sharing) vs TRL, ${PRECISION}, micro-batch 2" 150 \
        "$PYTHON" bench/trl_comparison.py "${TRL[@]}" --precision "$PRECISION" --micro-batch 2 "${TRL_EXTRA[@]}"
else
    echo "== TRL is not installed: the TRL comparison did not run"
fi
# GPU_CHECK_TRL_RUNS=one: only the comparison above (the CPU smoke test: the others run the same
# script with other arguments).
if [[ -n "$HAS_TRL" && "${GPU_CHECK_TRL_RUNS:-all}" == all ]]; then
    # The default shares each prompt (three passes); on a host-bound step the passes may cost more
    # than the tokens they save: the same default without it. (ZeRO-3's speed: the training above.)
    bench "plot_ds (default, prompt sharing off) vs TRL, ${PRECISION}, micro-batch 2" 150 \
        "$PYTHON" bench/trl_comparison.py "${TRL[@]}" --precision "$PRECISION" --micro-batch 2 "${TRL_EXTRA[@]}" \
        --plot-ds-args "--model.share_prompt false"
fi

bench "PLOT overhead (one GPU: the slice bytes need two ranks, see docs/benchmarks.md)" 120 \
    "$PYTHON" bench/plot_overhead.py --steps "$BENCH_STEPS" --warmup 1 "${COMMON[@]}"

bench "batched Sinkhorn vs a loop over POT's ot.emd2" 90 \
    "$PYTHON" bench/sinkhorn_vs_pot.py --model "$MODEL" --problems "${GPU_CHECK_PROBLEMS:-1024}" --repeats 3

echo "== where a step's time goes (host vs kernels) and what the host waits for, DPO + PLOT: profile.txt"
started=$SECONDS
timeout 120 "$PYTHON" bench/profile_step.py --steps "$BENCH_STEPS" --warmup 3 --top 40 "${COMMON[@]}" \
    > "$RESULTS/profile.txt" 2>>"$BENCH_LOG" || FAILED+=("profile")
grep -E "^(device|step seconds|== host waits)" "$RESULTS/profile.txt"
took "$started"

if [[ -n "$HAS_TRL" && "${GPU_CHECK_TRL_RUNS:-all}" == all ]]; then
    bench "plot_ds vs TRL, ${PRECISION}, micro-batch 8" 130 \
        "$PYTHON" bench/trl_comparison.py "${TRL[@]}" --precision "$PRECISION" --micro-batch 8 "${TRL_EXTRA[@]}"
fi

# Padding-free batches: what packing saves where the attention is varlen (flash attention, when
# installed; else sdpa's dense mask over the packed row, which the JSON's "attention" says).
read -r -a PACKING_EXTRA <<< "${GPU_CHECK_PACKING_ARGS:-}"
bench "padded vs packed rows (data.packing), ${PRECISION}, micro-batch 8" 120 \
    "$PYTHON" bench/packing.py --model "$MODEL" --data "$DATA" --device "$DEVICE" --precision "$PRECISION" \
    --pairs 64 --micro-batch 8 --max-length 512 --max-prompt-length 256 "${PACKING_EXTRA[@]}"

# The LM head at a 16k-token pair (12288 response positions): the tiled head against the whole
# [N, V] head, peak allocated and time.
HEAD_POSITIONS="${GPU_CHECK_HEAD_POSITIONS:-12288}"
HEAD_DTYPE="$([[ "$PRECISION" == fp32 ]] && echo float32 || echo bfloat16)"
bench "tiled vs whole LM head, N = ${HEAD_POSITIONS} (12288: a 16k-token pair), ${HEAD_DTYPE}" 120 \
    "$PYTHON" bench/tiled_head.py --model "$MODEL" --positions "$HEAD_POSITIONS" --dtype "$HEAD_DTYPE" --repeats 3

# The memory plan (plot-plan's model) against torch.cuda.max_memory_allocated on one rank, for
# configurations that differ in what dominates (target: within 10%). GPU_CHECK_PLAN_CONFIGS: names
# in bench/memory_plan.py, or none (the CPU smoke test: the training above logs the plan's peak
# beside the measured one, memory/peak_predicted_gb in train_last_step.json).
PLAN_CONFIGS="${GPU_CHECK_PLAN_CONFIGS:-zero2_1rank_512,zero3_1rank_1k_lora,zero3_1rank_2k_ckpt,zero3_1rank_4k_ckpt_tiled}"
if [[ "$PLAN_CONFIGS" != none ]]; then
    bench "memory plan vs max_memory_allocated, ${PRECISION}, one rank" 300 \
        "$PYTHON" bench/memory_plan.py --model "$MODEL" --precision "$PRECISION" --only "$PLAN_CONFIGS" \
        --budget-gap 0.10
fi

# The comparison grid at full lengths, one seed: what each variant costs per step and in memory on a
# GPU. The model here has random weights (the real one does not fit what a run carries), so its
# quality columns mean nothing; docs/results.md holds the real model's. Last: its limit is the
# lease's rest, and a grid cut short still reports the runs it finished.
read -r -a COMPARE_EXTRA <<< "${GPU_CHECK_COMPARE_ARGS:-}"
echo "== plot-compare grid (configs/grids/champ.yaml, seed 1, full lengths): compare/compare.md"
started=$SECONDS
timeout "${GPU_CHECK_COMPARE_LIMIT:-300}" "$PYTHON" -m plot_ds.compare --grid configs/grids/champ.yaml \
    --output "$RESULTS/compare" --seeds 1 --discard-weights --model.name_or_path "$MODEL" --data.source "$DATA" \
    --train.precision "$PRECISION" --data.max_length 512 --data.max_prompt_length 256 "${COMPARE_EXTRA[@]}" \
    > "$RESULTS/compare.log" 2>&1 || FAILED+=("compare")
"$PYTHON" -m plot_ds.compare --grid configs/grids/champ.yaml --output "$RESULTS/compare" --seeds 1 --report-only \
    --model.name_or_path "$MODEL" --data.source "$DATA" --train.precision "$PRECISION" --data.max_length 512 \
    --data.max_prompt_length 256 "${COMPARE_EXTRA[@]}" >> "$RESULTS/compare.log" 2>&1
grep -E "^\[plot-compare\] [0-9]" "$RESULTS/compare.log"
cat "$RESULTS/compare/compare.md" 2>/dev/null
took "$started"

if (( ${#FAILED[@]} )); then
    echo "== failed: ${FAILED[*]}; results so far in $RESULTS"
    exit 1
fi
echo "== done; results in $RESULTS"
