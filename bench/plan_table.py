"""The smallest setup the memory plan says fits DPO + PLOT for large models' shapes: for each model
and tokens per row, the fewest 80 GiB GPUs (8 per node) on which the defaults fit, or on which the
plan's nearest fix does (a shorter max_length does not count): once training every weight on the
GPUs (no adapters, no offload), once with LoRA and offload allowed. The plan's prediction, not a
measurement: README's table.

    python bench/plan_table.py [--tokens 4096,32768] [--gpu-memory-gb 80] [--out results/plan_table.jsonl]

Model shapes: bench/model_shapes/<name>/config.json (the published configs' values).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("llama-3-8b", "llama-3-70b", "qwen2.5-72b")
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def smallest_setup(name: str, tokens: int, memory_gb: float, full_training: bool) -> dict:
    from plot_ds.config import load_config
    from plot_ds.planning.fixes import nearest_fixes
    from plot_ds.planning.memory_plan import DataLengths, Machine, plan_memory
    from plot_ds.planning.model_shape import read_model_shape

    folder = os.path.join(HERE, "model_shapes", name)
    shape = read_model_shape(folder)
    overrides = {
        "model.name_or_path": folder,
        "train.micro_batch_size": 1,
        "data.max_length": tokens,
        "data.max_prompt_length": tokens // 4,
    }
    config = load_config(None, overrides)
    lengths = DataLengths.stated(tokens, tokens // 4)
    for ranks in RANKS:
        machine = Machine(ranks=ranks, ranks_per_node=min(ranks, 8), device="gpu", device_memory_gb=memory_gb)
        plan = plan_memory(config, shape, machine, lengths)
        if plan.fits:
            return record(name, tokens, ranks, {}, plan, full_training)
        for fix in nearest_fixes(config, shape, machine, lengths, full_training=full_training):
            if "data.max_length" not in fix.overrides:
                return record(name, tokens, ranks, fix.overrides, fix.plan, full_training)
    return {"model": name, "tokens": tokens, "full_training": full_training, "ranks": None}


def record(name: str, tokens: int, ranks: int, overrides: dict, plan, full_training: bool) -> dict:
    return {
        "model": name,
        "tokens": tokens,
        "full_training": full_training,
        "ranks": ranks,
        "settings": overrides,
        "peak_gb": round(plan.peak_gb, 1),
        "peak_phase": plan.peak_phase,
        "summary": plan.summary,
        "host_gb_per_node": round(plan.host_bytes / 2**30, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,32768")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for name in args.models.split(","):
        for tokens in map(int, args.tokens.split(",")):
            for full_training in (True, False):
                result = smallest_setup(name, tokens, args.gpu_memory_gb, full_training)
                print(json.dumps(result), flush=True)
                if args.out:
                    with open(args.out, "a") as handle:
                        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
