"""What sorting over the global batch costs AOT, side by side in one run: the same training steps
with AOT and with DPO (same engines, batches and reference), alternating, once with each rank's
share in one micro-batch (AOT gathers its table right after the forward) and once accumulating
(AOT first runs a forward without gradients over all micro-batches).

    python bench/global_batch_cost.py [--steps 3] [--warmup 1] [--section.key value ...]
    deepspeed --num_gpus 2 bench/global_batch_cost.py [...]

``--splits 2x1,1x2`` (default) are per-rank micro-batch x accumulation steps with the same global
batch. Prints one JSON line: per split the median step seconds of each objective, their ratio
(median of per-step ratios), and the bytes each rank receives for the table per step.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepspeed.accelerator import get_accelerator  # noqa: E402

from plot_ds.config import load_config, parse_overrides  # noqa: E402
from plot_ds.engine.engines import destroy_engine  # noqa: E402
from plot_ds.pair_batch import GlobalPairs  # noqa: E402
from plot_ds.objectives.objective import Objective, build_vanilla  # noqa: E402
from plot_ds.training.run import setup_run  # noqa: E402
from plot_ds.training.loop import train_step  # noqa: E402


def timed_step(run, batches) -> float:
    get_accelerator().synchronize()
    start = time.perf_counter()
    train_step(run, batches)
    get_accelerator().synchronize()
    return time.perf_counter() - start


def measure_split(overrides: dict, micro: int, accumulation: int, steps: int, warmup: int) -> dict:
    config = load_config(
        None, {**overrides, "train.micro_batch_size": micro, "train.gradient_accumulation_steps": accumulation}
    )
    aot_run = setup_run(config)
    dpo = Objective(
        build_vanilla(dataclasses.replace(config.objective, name="dpo")), aot_run.objective.plot, config.plot.alpha
    )
    runs = {"aot": aot_run, "dpo": dataclasses.replace(aot_run, objective=dpo)}
    times = {"aot": [], "dpo": []}
    for step in range(warmup + steps):
        batches = aot_run.micro_batches(step)
        order = ["dpo", "aot"] if step % 2 == 0 else ["aot", "dpo"]  # neither always on a warmer cache
        for name in order:
            seconds = timed_step(runs[name], batches)
            if step >= warmup:
                times[name].append(seconds)
    global_batch = aot_run.sampler.global_batch_size
    for engine in (aot_run.policy, getattr(aot_run.reference, "engine", None)):
        if engine is not None:
            destroy_engine(engine)
    return {
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "step_seconds_dpo_median": statistics.median(times["dpo"]),
        "step_seconds_aot_median": statistics.median(times["aot"]),
        "aot_over_dpo_paired_median": statistics.median(a / d for a, d in zip(times["aot"], times["dpo"])),
        "aot_over_dpo_by_step": [round(a / d, 4) for a, d in zip(times["aot"], times["dpo"])],
        "table_bytes_received_per_rank": global_batch * len(GlobalPairs.COLUMNS) * 8,
        "pre_pass": accumulation > 1,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3, help="measured steps per objective and split")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--splits", default="2x1,1x2", help="per-rank micro-batch x accumulation steps")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    overrides = {
        "train.save_checkpoint": False,
        "train.resume": "none",
        "data.eval_size": 0,
        "plot.enabled": False,
        **parse_overrides(rest),
        "objective.name": "aot",
    }
    results = [
        measure_split(overrides, *map(int, split.split("x")), args.steps, args.warmup)
        for split in args.splits.split(",")
    ]
    if int(os.environ.get("RANK", "0")) == 0:
        config = load_config(None, overrides)
        print(
            json.dumps(
                {
                    "benchmark": "global_batch_cost",
                    "device": get_accelerator().device_name(),
                    "ranks": int(os.environ.get("WORLD_SIZE", "1")),
                    "model": config.model.name_or_path,
                    "max_length": config.data.max_length,
                    "plot": config.plot.active,
                    "splits": results,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
