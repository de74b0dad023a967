"""The memory plan against the measured peak, configuration by configuration, in one run.

    python bench/memory_plan.py [--only NAME,NAME] [--out results/memory_plan.jsonl]

Each configuration starts ranks under torchrun, sets the run up exactly as ``plot-train`` does
(``setup_run``: the real SmolLM2-135M, fp32 on a CPU, the plan made before the weights load, with
the process's resident memory before them as its runtime), then takes two optimizer steps on pairs
of about ``tokens`` tokens built from CHAMP's text (``bench/long_pairs.py``, every pair alike).
Measured on every rank: on a CPU the resident high-water mark over the two steps (VmHWM, reset
through /proc/self/clear_refs after setup) against the plan's peak; on a GPU (``bench/gpu_check.sh``)
torch's ``max_memory_allocated`` against the plan's tensors (its peak without the CUDA runtime and
the allocator's margin). Also the memory held between the steps against the plan's model states. glibc's ``MALLOC_MMAP_THRESHOLD_`` is set to 64 KiB in the ranks,
so that freed tensors leave the resident set at once and the peak is that of live memory. The
largest rank's peak is compared with the plan's; ``fits`` is checked against a device memory
between the two (``--budget-gap``): the verdict must be right on both sides of the prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (ranks, tokens per pair, overrides). What dominates differs: the model states (ZeRO-2 on one
# rank), the activations (long pairs, no checkpointing), the reference, LoRA's frozen base.
CONFIGS = {
    "zero3_1rank_512": (1, 512, {}),
    "zero2_1rank_512": (1, 512, {"deepspeed.config": "ds_configs/zero2.json"}),
    "zero3_2ranks_1k": (2, 1024, {}),
    "zero3_4ranks_256_noplot": (4, 256, {"plot.enabled": False}),
    "zero2_2ranks_256_lora": (2, 256, {"deepspeed.config": "ds_configs/zero2.json", "adapter.method": "lora"}),
    "zero3_1rank_1k_lora": (1, 1024, {"adapter.method": "lora"}),
    "zero3_1rank_2k_ckpt": (1, 2048, {"model.gradient_checkpointing": True}),
    "zero3_1rank_1k_cache": (1, 1024, {"reference.mode": "cache"}),
    "zero3_3ranks_2k_seq3": (3, 2048, {"parallel.sequence": 3}),
    "zero3_2ranks_2k_ckpt_tiled": (2, 2048, {"model.gradient_checkpointing": True, "model.tiled_head": True}),
    "zero3_1rank_4k_ckpt_tiled": (
        1,
        4096,
        {"model.gradient_checkpointing": True, "model.tiled_head": True, "train.micro_batch_size": 1},
    ),
    "zero3_1rank_256_sft": (1, 256, {"objective.name": "sft", "plot.enabled": False}),
}


def worker(overrides: dict, out: str) -> None:
    import torch

    from plot_ds.config import load_config
    from plot_ds.planning.check import process_status_gb as status_gb
    from plot_ds.distributed.process_group import barrier
    from plot_ds.training.host_memory import trim_host_heap
    from plot_ds.training.loop import train_step
    from plot_ds.training.run import setup_run

    from deepspeed.accelerator import get_accelerator

    run = setup_run(load_config(None, overrides))
    barrier()
    # On an accelerator torch's allocator counts the tensors (the plan's peak without the runtime and
    # the allocator's margin); on a CPU the resident set counts everything (the plan's whole peak).
    on_device = run.policy.device.type != "cpu"
    if on_device:
        get_accelerator().reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM from here on
    state = 0.0
    for step in range(2):
        if step == 1:  # the model states once the optimizer's exist: what is held between steps
            trim_host_heap()
            state = get_accelerator().memory_allocated() / 2**30 if on_device else status_gb("VmRSS")
        train_step(run, run.micro_batches(step))
    plan = run.plan
    # Between steps: ZeRO-2's gradient buffer is freed at the step.
    resident = ["parameters", "optimizer state", "buffers", "reference"] + ["runtime"] * (not on_device)
    resident += ["gradients"] * (plan.settings["zero_stage"] == 3)
    measured = {
        "rank": run.dist.rank,
        "measure": "max_memory_allocated" if on_device else "VmHWM",
        "state_gb": state,
        "state_predicted_gb": sum(plan.parts[name].bytes for name in resident) / 2**30,
        "peak_gb": get_accelerator().max_memory_allocated() / 2**30 if on_device else status_gb("VmHWM"),
        "predicted_gb": plan.tensor_peak_gb if on_device else plan.peak_gb,
        "phase": plan.peak_phase,
        "parts_gb": {name: plan.parts[name].bytes / 2**30 for name in plan.phases[plan.peak_phase]},
        "summary": plan.summary,
    }
    parts = [None] * run.dist.world_size
    torch.distributed.all_gather_object(parts, measured)
    if run.dist.is_main:
        with open(out, "w") as handle:
            json.dump(parts, handle)


def overrides_for(tokens: int, extra: dict, data: str, output_dir: str, args) -> dict:
    return {
        "model.name_or_path": args.model,
        "train.precision": args.precision,
        "data.source": data,
        "data.max_length": tokens + 64,
        "data.max_prompt_length": tokens // 4 + 32,
        "data.eval_size": 0,
        "train.micro_batch_size": 2,
        "train.max_steps": 2,
        "train.output_dir": output_dir,
        "train.resume": "none",
        **extra,
    }


def measure(name: str, tmp: str, tokenizer, args) -> dict:
    from bench.long_pairs import write_long_pairs

    ranks, tokens, extra = CONFIGS[name]
    data = os.path.join(tmp, f"pairs{tokens}_{ranks}.jsonl")
    if not os.path.exists(data):  # two micro-batches of 2 pairs per rank
        write_long_pairs(data, tokens, 2 * ranks * 2, tokenizer)
    out = os.path.join(tmp, f"{name}.json")
    overrides = overrides_for(tokens, extra, data, os.path.join(tmp, name), args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"]
    command += ["--master_addr=127.0.0.1", "--master_port=29533", os.path.abspath(__file__)]
    subprocess.run(command + ["--worker", json.dumps(overrides), "--out", out], check=True, env=env)
    with open(out) as handle:
        ranks_measured = json.load(handle)
    top = max(ranks_measured, key=lambda r: r["peak_gb"])
    predicted, peak = top["predicted_gb"], top["peak_gb"]
    # fits must be right both sides: a budget just under the measured peak, and just over it.
    gap = args.budget_gap
    verdicts = [(peak * (1 - gap) >= predicted) is False, (peak * (1 + gap) >= predicted) is True]
    return {
        "config": name,
        "ranks": ranks,
        "tokens": tokens,
        "overrides": extra,
        "measured_gb": round(peak, 3),
        "predicted_gb": round(predicted, 3),
        "error": round(predicted / peak - 1, 4),
        "state_gb": round(top["state_gb"], 3),
        "state_predicted_gb": round(top["state_predicted_gb"], 3),
        "verdicts_right": all(verdicts),
        "measure": top["measure"],
        "phase": top["phase"],
        "summary": top["summary"],
        "parts_gb": {k: round(v, 3) for k, v in top["parts_gb"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--budget-gap", type=float, default=0.15, help="the budgets either side of the peak")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--precision", default="auto", help="train.precision (auto: fp32 on a CPU, bf16 on a GPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.out)
        return
    from bench.long_pairs import tokenizer_of

    tokenizer = tokenizer_of(args.model)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            result = measure(name, tmp, tokenizer, args)
            print(json.dumps(result), flush=True)
            results.append(result)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(result) + "\n")
    summary = {
        "benchmark": "memory_plan",
        "configs": len(results),
        "worst_error": max(abs(r["error"]) for r in results),
        "all_verdicts_right": all(r["verdicts_right"] for r in results),
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
