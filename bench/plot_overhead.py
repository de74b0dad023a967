"""PLOT overhead, side by side in one run: the same training steps with and without the PLOT term
(alpha = 0 vs on), alternating on the same engines and batches, plus the embedding-slice bytes
against a full gather of the embedding matrix.

A step's time moves by several percent from one step to the next on a shared machine, which hides
an overhead of 1-3%. So the loss path alone (from the head's logits to their gradient: log-probs,
the vanilla loss, PLOT) is also timed with and without PLOT, alternating many times on the same
logits; its extra time over the step's median gives the overhead with far less noise.

    python bench/plot_overhead.py [--steps 4] [--section.key value ...]        # one process
    deepspeed --num_gpus 2 bench/plot_overhead.py [...]                        # slice bytes need >= 2 ranks

Defaults are the default run's shapes (SmolLM2-135M-Instruct, DPO, CHAMP, micro-batch 2, 256 tokens).
Prints one JSON line with the ratios; each timing is the median over the measured steps.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from plot_ds.config import load_config, parse_overrides  # noqa: E402
from plot_ds.distributed.embedding_slice import EmbeddingRows  # noqa: E402
from plot_ds.forward.logprobs import pair_outputs  # noqa: E402
from plot_ds.training.monitoring import reduce_metrics  # noqa: E402
from plot_ds.objectives.objective import Objective  # noqa: E402
from plot_ds.pair_batch import GlobalTotals  # noqa: E402
from plot_ds.forward.pair_forward import head_logits  # noqa: E402
from plot_ds.training.run import setup_run  # noqa: E402
from plot_ds.training.loop import train_step  # noqa: E402


def timed_step(run, batches):
    get_accelerator().synchronize()
    start = time.perf_counter()
    sums, _ = train_step(run, batches)
    metrics = reduce_metrics(sums)  # includes the step's last collective: all ranks are done
    get_accelerator().synchronize()
    return time.perf_counter() - start, metrics


def loss_path_seconds(run, objectives: dict, batch, repeats: int) -> dict[str, float]:
    """Median seconds of the loss path's forward and backward per objective, alternating, on one
    batch's head logits (a fresh copy each time: the backward overwrites them)."""
    policy = run.policy
    with torch.no_grad():
        logits, tokens = head_logits(policy, batch, run.policy_layout.rows)
        needs_reference_logits = any(o.needs.reference_logits for o in objectives.values())
        reference_out = run.reference.outputs(batch, needs_reference_logits, policy.device) if run.reference else None
    totals = GlobalTotals.from_counts(batch.counts, policy.device)
    times = {name: [] for name in objectives}
    for _ in range(repeats):
        for name, objective in objectives.items():
            head = logits.detach().clone().requires_grad_()
            get_accelerator().synchronize()
            start = time.perf_counter()
            loss, _ = objective(
                pair_outputs(head * 1.0, tokens, objective.needs.policy_logits, objective.needs.top_k),
                reference_out,
                totals,
            )
            loss.backward()
            get_accelerator().synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per variant")
    parser.add_argument(
        "--loss-path-repeats", type=int, default=20, help="timings per variant of the loss path alone (0: skip)"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    config = load_config(
        None, {"train.save_checkpoint": False, "train.resume": "none", "data.eval_size": 0, **parse_overrides(rest)}
    )
    if not config.plot.active:
        raise SystemExit("plot.enabled must be true and plot.alpha > 0 for this benchmark")
    with_plot_run = setup_run(config)
    dist, policy, sampler, with_plot = (
        with_plot_run.dist,
        with_plot_run.policy,
        with_plot_run.sampler,
        with_plot_run.objective,
    )
    without_plot = Objective(with_plot.vanilla, None)
    # The same engines, batches and reference, with the vanilla objective only.
    runs = {"plot": with_plot_run, "vanilla": dataclasses.replace(with_plot_run, objective=without_plot)}

    times = {"plot": [], "vanilla": []}
    losses = {"plot": [], "vanilla": []}  # what each variant computed: PLOT's term only in one
    slice_bytes, slice_rows = [], []
    for step in range(args.warmup + args.steps):
        batches = with_plot_run.micro_batches(step)
        # Alternate the order so that neither variant always runs on a warmer cache.
        order = ["vanilla", "plot"]
        for name in order if step % 2 == 0 else order[::-1]:
            seconds, metrics = timed_step(runs[name], batches)
            if step >= args.warmup:
                times[name].append(seconds)
                losses[name].append({key: metrics.get(key) for key in ("loss/total", "loss/vanilla", "loss/plot")})
                if name == "plot":
                    slice_bytes.append(metrics["plot/slice_bytes"])
                    slice_rows.append(metrics["plot/slice_rows"])
        if dist.is_main:
            print(f"[bench] step {step + 1}/{args.warmup + args.steps} done", file=sys.stderr, flush=True)

    loss_path = {}
    if args.loss_path_repeats > 0:
        objectives = {"vanilla": without_plot, "plot": with_plot}
        batch = with_plot_run.micro_batches(0)[0]
        loss_path_seconds(with_plot_run, objectives, batch, 2)  # warm-up
        loss_path = loss_path_seconds(with_plot_run, objectives, batch, args.loss_path_repeats)

    embedding = policy.module.get_input_embeddings().weight
    full_bytes = EmbeddingRows(embedding).full_matrix_bytes
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "benchmark": "plot_overhead",
        "device": get_accelerator().device_name(),
        "ranks": dist.world_size,
        "model": config.model.name_or_path,
        "objective": config.objective.label,
        "micro_batch_size": config.train.micro_batch_size,
        "gradient_accumulation_steps": config.train.gradient_accumulation_steps,
        "max_length": config.data.max_length,
        "top_k": config.plot.top_k,
        "target": config.plot.target,
        "solver": config.plot.resolved_solver(get_accelerator().device_name()),
        "measured_steps": args.steps,
        "step_seconds_vanilla_median": median["vanilla"],
        "step_seconds_plot_median": median["plot"],
        "overhead_ratio": median["plot"] / median["vanilla"],
        # Both variants of a step run the same batches: the step's own ratio cancels how long its
        # batches are, which the ratio of medians does not.
        "overhead_ratio_by_step": [round(p / v, 4) for p, v in zip(times["plot"], times["vanilla"])],
        "overhead_ratio_paired_median": statistics.median(p / v for p, v in zip(times["plot"], times["vanilla"])),
        **(
            {
                "loss_path_seconds_vanilla": loss_path["vanilla"],
                "loss_path_seconds_plot": loss_path["plot"],
                # PLOT's extra time per micro-batch, on the step: the overhead without the step's noise.
                "overhead_ratio_from_loss_path": 1
                + (loss_path["plot"] - loss_path["vanilla"]) * len(sampler.micro_batches(0)) / median["vanilla"],
            }
            if loss_path
            else {}
        ),
        "alpha": config.plot.alpha,
        "losses_by_step": losses,
        "slice_rows_per_micro_batch": statistics.mean(slice_rows),
        "slice_bytes_per_micro_batch": statistics.mean(slice_bytes),
        "full_gather_bytes": full_bytes,
        "slice_to_full_bytes_ratio": statistics.mean(slice_bytes) / full_bytes,
    }
    if dist.is_main:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
