"""Where a training step's time goes: a few steps of the real train_step on the real engines, after a
warmup, under cProfile (host: Python, DeepSpeed's hooks, waits) and then torch.profiler (the
device's kernels). Prints the measured step times, the top host functions and the top device ops.

    python bench/profile_step.py [--steps 5] [--warmup 3] [--top 25] [--section.key value ...]

Not a ratio benchmark: a tool for finding what to make faster, on CPU or on a lent GPU.
"""

import argparse
import cProfile
import io
import json
import pstats
import statistics
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from plot_ds.config import load_config, parse_overrides  # noqa: E402
from plot_ds.engine.ds_config import zero_stage  # noqa: E402
from plot_ds.training.monitoring import reduce_metrics  # noqa: E402
from plot_ds.training.run import setup_run  # noqa: E402
from plot_ds.training.loop import train_step  # noqa: E402


# Ops whose result the host must wait for on a GPU (a value read back, or an output size that
# depends on values), and the CUDA runtime's own waits.
HOST_WAITS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::masked_select",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (each profiler)")
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled steps first")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    config = load_config(
        None, {"train.save_checkpoint": False, "train.resume": "none", "data.eval_size": 0, **parse_overrides(rest)}
    )
    run = setup_run(config)
    dist, ds_config = run.dist, run.ds_config
    accelerator = get_accelerator()

    def step(number):
        batches = run.micro_batches(number)
        accelerator.synchronize()
        started = time.perf_counter()
        sums, _ = train_step(run, batches)
        reduce_metrics(sums)
        accelerator.synchronize()
        return time.perf_counter() - started

    warm = [step(n) for n in range(args.warmup)]
    host = cProfile.Profile()
    host.enable()
    profiled = [step(n) for n in range(args.warmup, args.warmup + args.steps)]
    host.disable()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if accelerator.device_name() == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as device_profile:
        kernels = [step(n) for n in range(args.warmup + args.steps, args.warmup + 2 * args.steps)]
    plain = [step(n) for n in range(args.warmup + 2 * args.steps, args.warmup + 3 * args.steps)]
    if not dist.is_main:
        return
    print(
        f"device {accelerator.device_name()}, ranks {dist.world_size}, precision {config.train.precision}, "
        f"micro-batch {config.train.micro_batch_size}, max_length {config.data.max_length}, "
        f"objective {config.objective.label}, plot {config.plot.enabled}, deepspeed {config.deepspeed.config} "
        f"(ZeRO-{zero_stage(ds_config)})"
    )
    print(
        f"step seconds: warmup {[round(t, 3) for t in warm]}; median unprofiled "
        f"{statistics.median(plain):.3f}, under cProfile {statistics.median(profiled):.3f}, under "
        f"torch.profiler {statistics.median(kernels):.3f}"
    )
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(args.top)
    print("== host, by own time, over", args.steps, "steps\n" + text.getvalue().split("\n\n", 1)[-1].strip())
    sort = "self_cuda_time_total" if accelerator.device_name() == "cuda" else "self_cpu_time_total"
    print(f"== ops by {sort}, over {args.steps} steps")
    averages = device_profile.key_averages()
    print(averages.table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
    # The timer itself adds two device syncs per step (cudaDeviceSynchronize).
    waits = {event.key: event.count / args.steps for event in averages if event.key in HOST_WAITS}
    print(f"== host waits per step (on a GPU): {json.dumps(dict(sorted(waits.items())))}")


if __name__ == "__main__":
    main()
