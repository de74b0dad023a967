"""The training loop, explicit in one place: ``train`` = setup (``run.setup_run``) -> ``start``
(run files, monitor, resume) -> the loop over steps -> ``finish`` (final eval, checkpoint, export)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpointing import load_checkpoint, save_checkpoint
from ..config import Config
from ..distributed.process_group import DistInfo, all_reduce_sum, barrier, max_over_ranks
from .evaluation import evaluate, generation_report, generations_markdown
from .hf_export import export_hf_model
from .host_memory import peak_resident_gb, trim_host_heap
from ..forward.logprobs import to_device
from .monitoring import RunMonitor, StepLog, reduce_metrics
from ..forward.micro_batch import micro_batch_results
from ..pair_batch import GlobalTotals, PairBatch, PairCounts
from .preemption import EXIT_PREEMPTED, StopRequest
from .run import Run, setup_run


def train_step(run: Run, micro_batches: list[PairBatch], before_update: Optional[Callable[[], None]] = None):
    """Forward and backward every micro-batch of this rank's share of one global batch, then the
    optimizer step. Returns this rank's metric shares (sum over ranks = global means) and the
    global totals. ``before_update`` runs once the step's gradients are complete, before the
    optimizer uses them."""
    policy = run.policy
    counts = PairCounts.total(batch.counts for batch in micro_batches)
    if run.policy_layout.sequence is not None:
        counts = run.policy_layout.sequence.counted(counts)
    counts = to_device(counts.as_tensor(), policy.device)
    totals = GlobalTotals.from_counts(all_reduce_sum(counts))
    sums: dict[str, torch.Tensor] = {}
    results = micro_batch_results(
        run.models("train"), micro_batches, run.objective, totals, run.config.train.micro_batch_size, run.dist.rank
    )
    for index, result in enumerate(results):
        if policy.device.type == "cpu":
            # The backward is the step's peak; the forward's freed blocks, resident in glibc's heap,
            # would otherwise add to it.
            trim_host_heap()
        # The loss is this micro-batch's share of the global mean; DeepSpeed would divide it by the
        # accumulation steps (scale_wrt_gas) and average gradients over ranks, so scale by the
        # rank count and skip the former: the step's gradient is then the global-mean gradient.
        policy.backward(result.loss * run.dist.world_size, scale_wrt_gas=False)
        if before_update is not None and index == len(micro_batches) - 1:
            before_update()
        policy.step()  # an optimizer update only at the accumulation boundary
        for name, value in result.metrics.items():
            sums[name] = sums.get(name, 0.0) + value
    return sums, totals


@dataclass
class LoopState:
    monitor: RunMonitor
    history: StepLog
    pair_log: StepLog
    start_step: int
    stop: StopRequest = field(default_factory=StopRequest)
    faults: int = 0  # non-finite steps in a row
    skipped: int = 0  # non-finite steps in all
    saved: Path | None = None
    started: float = field(default_factory=time.perf_counter)


def train(config: Config, dist: Optional[DistInfo] = None) -> dict:
    run = setup_run(config, dist)
    state = start(run)
    outcome = "completed"
    for step in range(state.start_step, config.train.max_steps):
        outcome = run_step(run, state, step)
        if outcome != "completed":
            break
    return finish(run, state, outcome)


def start(run: Run) -> LoopState:
    """The run's files (config.yaml, ds_config.json, data_report.json), the monitor and the step
    logs; the checkpoint restored when resuming."""
    config, dist, output_dir = run.config, run.dist, Path(run.config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        config.save(output_dir / "config.yaml")
        (output_dir / "ds_config.json").write_text(json.dumps(run.ds_config, indent=2))
        (output_dir / "data_report.json").write_text(json.dumps([r.to_dict() for r in run.reports], indent=2))
        groups = f" in {dist.data_ranks} sequence group(s) of {dist.sequence}" if dist.sequence > 1 else ""
        print(
            f"[plot_ds] {dist.world_size} rank(s){groups} on {dist.device.type}, rendezvous "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}; config:\n{config.to_yaml()}",
            flush=True,
        )
        for report in run.reports:
            print(f"[plot_ds] data {report.summary()}", flush=True)
    train, sampler = config.train, run.sampler
    monitor = RunMonitor(output_dir / "tensorboard", train.max_steps, dist.is_main, train.tensorboard)
    monitor.message(
        f"[plot_ds] {len(run.train_examples)} training pairs, {len(run.eval_examples)} held out; "
        f"global batch {sampler.global_batch_size}, {sampler.steps_per_epoch} steps per epoch "
        f"(the last one with {sampler.last_batch_size} pairs); {train.max_steps} steps = "
        f"{train.max_steps / sampler.steps_per_epoch:.2f} epochs"
    )
    start_step = 0
    if run.resume_from is not None:
        info = load_checkpoint(run.policy, run.resume_from, dist.rank)
        start_step = sampler.load_state_dict(info["data"])
        monitor.message(f"[plot_ds] resumed from {run.resume_from} at step {start_step}")
        monitor.advance(start_step)
    return LoopState(
        monitor,
        StepLog(output_dir / "train_history.jsonl", start_step, enabled=dist.is_main),
        StepLog(output_dir / f"pair_ids.rank{dist.rank}.jsonl", start_step, enabled=train.log_pair_ids),
        start_step,
    )


def run_step(run: Run, state: LoopState, step: int) -> str:
    """One optimizer step and what follows it (logs, fault and stop handling, periodic checkpoint
    and evaluation). Returns "completed" to go on, or why the run stops: "faults", "preempted"."""
    train, monitor, done = run.config.train, state.monitor, step + 1
    micro_batches = run.micro_batches(step)
    state.pair_log.write(
        {
            "step": done,
            "epoch": run.sampler.epoch_of(step),
            "ids": [pair_id for batch in micro_batches for pair_id in batch.pair_ids],
        }
    )
    lr = run.policy.get_lr()[0]  # the scheduler moves on inside the step
    sums, totals = train_step(run, micro_batches)
    monitor.count(float(totals.input_tokens), float(totals.pairs))
    # DeepSpeed skips the update on every rank when the global gradient norm is not finite.
    state.faults = 0 if run.policy.was_step_applied() else state.faults + 1
    state.skipped += state.faults > 0
    if state.faults:
        monitor.message(
            f"[plot_ds] step {done}: non-finite loss or gradient; the update was skipped on every "
            f"rank ({state.faults} in a row, at most {train.max_consecutive_faults})"
        )
    if done % train.log_every == 0 or done == train.max_steps or state.faults:
        log_step(run, state, done, sums, lr)
    monitor.advance()
    if state.faults >= train.max_consecutive_faults:
        # Skipped updates left the weights as they were before the first fault.
        state.saved = checkpoint(run, done)
        monitor.message(
            f"[plot_ds] stopping: {state.faults} consecutive non-finite steps (last {done}). The "
            f"weights in {state.saved} are those from before step {done - state.faults + 1}. Lower "
            f"train.lr, check the data around these steps, or use fp32/bf16 over fp16."
        )
        return "faults"
    if state.stop.agreed(run.policy.device):
        state.saved = checkpoint(run, done)
        monitor.message(
            f"[plot_ds] {state.stop.signal_name or 'a stop signal on another rank'}: checkpoint "
            f"{state.saved} written at step {done}; exiting with {EXIT_PREEMPTED} (requeue to resume)"
        )
        return "preempted"
    if train.save_every and done % train.save_every == 0 and done != train.max_steps:
        state.saved = checkpoint(run, done)
    if train.eval_every and done % train.eval_every == 0 and done != train.max_steps:
        run_eval(run, state.monitor, done)
    return "completed"


def log_step(run: Run, state: LoopState, done: int, sums: dict, lr: float) -> None:
    metrics = reduce_metrics(sums)
    metrics["lr"] = lr
    grad_norm = run.policy.get_global_grad_norm()
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics["faults/skipped_steps"] = float(state.skipped)
    metrics["memory/peak_host_gb"] = max_over_ranks(peak_resident_gb())
    if run.dist.is_main:
        metrics.update(state.monitor.throughput())
    on_cpu = run.policy.device.type == "cpu"
    if not on_cpu:  # host memory is what the system reports on a CPU
        from deepspeed.accelerator import get_accelerator

        metrics["memory/peak_device_gb"] = get_accelerator().max_memory_allocated() / 2**30
    if run.plan is not None:  # beside the measured figure: the resident set, or torch's allocated tensors
        metrics["memory/peak_predicted_gb"] = run.plan.peak_gb if on_cpu else run.plan.tensor_peak_gb
    state.monitor.log(done, metrics)
    state.history.write({"step": done, **metrics})


def checkpoint(run: Run, step: int) -> Path:
    train = run.config.train
    return save_checkpoint(
        run.policy,
        Path(train.output_dir),
        step,
        run.dist.rank,
        run.dist.is_main,
        run.sampler.state_dict(step),
        run.config,
        train.keep_last,
    )


def run_eval(run: Run, monitor: RunMonitor, step: int) -> dict:
    """Held-out metrics and generations, logged at ``step``."""
    results = evaluate(run, run.eval_examples)
    answer_metrics, generations = generation_report(
        run.policy, run.tokenizer, run.eval_examples, run.config, run.dist.rank, run.dist.world_size
    )
    results.update(answer_metrics)
    monitor.log(step, results)
    if generations:
        monitor.log_text("eval/generations", generations_markdown(generations), step)
    if results:
        monitor.message(
            "[plot_ds] step {}: {}".format(step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(results.items())))
        )
    return {**results, "generations": generations}


def finish(run: Run, state: LoopState, outcome: str) -> dict:
    """A completed run: final evaluation, checkpoint, Hugging Face export, and where it all went."""
    state.stop.restore()
    elapsed = time.perf_counter() - state.started
    state.history.close()
    state.pair_log.close()
    summary = {"outcome": outcome, "train_seconds": elapsed, "checkpoint": str(state.saved) if state.saved else None}
    if outcome != "completed":
        state.monitor.close()
        return summary
    train, output_dir, is_main = run.config.train, Path(run.config.train.output_dir), run.dist.is_main
    eval_results = run_eval(run, state.monitor, train.max_steps)
    if train.save_checkpoint:
        state.saved = checkpoint(run, train.max_steps)
    exported = (
        export_hf_model(run.policy, run.tokenizer, output_dir / "final_model", is_main) if train.export_final else []
    )
    barrier()
    state.monitor.close()
    summary.update(eval=eval_results, checkpoint=str(state.saved) if state.saved else None)
    if is_main:
        (output_dir / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
        (output_dir / "train_history.json").write_text(json.dumps(state.history.records(), indent=2))
        print(f"[plot_ds] done: steps {state.start_step + 1}-{train.max_steps} in {elapsed:.1f}s", flush=True)
        report_locations(output_dir, state.saved, exported, train.tensorboard)
    return summary


def report_locations(output_dir: Path, saved: Path | None, exported: list[Path], tensorboard: bool) -> None:
    print(f"[plot_ds] run directory:  {output_dir.resolve()}", flush=True)
    if saved:
        print(f"[plot_ds] checkpoint:     {Path(saved).resolve()}", flush=True)
    if exported:
        print(f"[plot_ds] final model:    {exported[0].resolve()}  (Hugging Face, safetensors)", flush=True)
    if len(exported) > 1:
        print(
            f"[plot_ds] adapter:        {exported[1].resolve()}  (PEFT: PeftModel.from_pretrained(base, path))",
            flush=True,
        )
    if tensorboard:
        print(f"[plot_ds] TensorBoard:    tensorboard --logdir {(output_dir / 'tensorboard').resolve()}", flush=True)
    print(f"[plot_ds] eval results:   {(output_dir / 'eval_results.json').resolve()}", flush=True)
