"""The training loop, explicit in one place: data -> engines -> steps -> eval -> checkpoint."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpointing import export_hf_model, find_checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .data import GlobalBatchSampler, collate, prepare_datasets
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from .engine import build_policy_engine, choose_ds_config, load_ds_config, load_tokenizer, trim_host_heap
from .evaluation import evaluate, generation_report, generations_markdown
from .embedding_slice import embedding_rows_for
from .logprobs import forward_pairs, reference_pairs, to_device
from .monitoring import RunMonitor, StepLog, reduce_metrics
from .preemption import EXIT_PREEMPTED, StopRequest
from .objectives import GlobalTotals, build_objective
from .reference_cache import prepare_reference


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch's dependencies
        pass


def train_step(policy, reference, objective, micro_batches: list[dict], world_size: int,
               before_update: Optional[Callable[[], None]] = None):
    """Forward and backward every micro-batch of one global-batch share, then the optimizer step.

    Returns this rank's metric shares (sum over ranks = global means) and the global totals.
    ``before_update`` runs once the step's gradients are complete, before the optimizer uses them.
    """
    counts = to_device(torch.stack([batch["counts"] for batch in micro_batches]).sum(0), policy.device)
    totals = GlobalTotals.from_counts(all_reduce_sum(counts))
    sums: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        reference_out = reference_pairs(reference, batch, objective.needs_reference_logits, policy.device)
        policy_out = forward_pairs(policy, batch, objective.needs_policy_logits, objective.policy_top_k)
        loss, metrics = objective(policy_out, reference_out, totals)
        if batch["weight"] != 1.0:  # a filler batch: every rank must run it, nothing may count
            loss = loss * batch["weight"]
            metrics = {name: value * batch["weight"] for name, value in metrics.items()}
        if policy.device.type == "cpu":
            # The backward is the step's peak; the forward's freed blocks, resident in glibc's heap,
            # would otherwise add to it (8% of the peak RSS here, at no measurable cost in time).
            trim_host_heap()
        # The loss is this micro-batch's share of the global mean; DeepSpeed would divide it by the
        # accumulation steps (scale_wrt_gas) and average gradients over ranks, so scale by the
        # rank count and skip the former: the step's gradient is then the global-mean gradient.
        policy.backward(loss * world_size, scale_wrt_gas=False)
        if before_update is not None and index == len(micro_batches) - 1:
            before_update()
        policy.step()  # an optimizer update only at the accumulation boundary
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
    return sums, totals


def _log_line(step: int, metrics: dict[str, float]) -> str:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    return f"[plot_ds] step {step}: {shown}"


def train(config: Config, dist: Optional[DistInfo] = None) -> dict:
    dist = dist or init_distributed()
    train_cfg = config.train
    seed_everything(train_cfg.seed)
    output_dir = Path(train_cfg.output_dir)
    resume_from = find_checkpoint(train_cfg.resume, output_dir)
    config.deepspeed.config = choose_ds_config(config, dist.world_size, resume_from)
    ds_config = load_ds_config(config, dist.world_size)
    output_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        config.save(output_dir / "config.yaml")
        (output_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        print(f"[plot_ds] {dist.world_size} rank(s) on {dist.device.type}, rendezvous "
              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}; config:\n{config.to_yaml()}",
              flush=True)

    tokenizer = load_tokenizer(config)
    train_examples, eval_examples, reports = prepare_datasets(
        config.data, tokenizer, preparer=dist.local_rank == 0, sync=barrier)
    if dist.is_main:
        (output_dir / "data_report.json").write_text(json.dumps([r.to_dict() for r in reports], indent=2))
        for report in reports:
            print(f"[plot_ds] data {report.summary()}", flush=True)
    sampler = GlobalBatchSampler(len(train_examples), train_cfg.micro_batch_size,
                                 train_cfg.gradient_accumulation_steps, dist.rank, dist.world_size,
                                 train_cfg.seed)
    policy = build_policy_engine(config, ds_config)
    objective = build_objective(config, embedding_rows_for(policy.module, config.plot))
    reference = prepare_reference(config, ds_config, tokenizer, objective, train_examples, eval_examples,
                                  reports, dist)

    monitor = RunMonitor(output_dir / "tensorboard", train_cfg.max_steps, dist.is_main,
                         train_cfg.tensorboard)
    monitor.message(f"[plot_ds] {len(train_examples)} training pairs, {len(eval_examples)} held out; "
                    f"global batch {sampler.global_batch_size}, {sampler.steps_per_epoch} steps per epoch "
                    f"(the last one with {sampler.last_batch_size} pairs); {train_cfg.max_steps} steps = "
                    f"{train_cfg.max_steps / sampler.steps_per_epoch:.2f} epochs")
    pad_id, filler = tokenizer.pad_token_id, train_examples[0]

    start_step = 0
    if resume_from is not None:
        info = load_checkpoint(policy, resume_from, dist.rank)
        start_step = sampler.load_state_dict(info["data"])
        monitor.message(f"[plot_ds] resumed from {resume_from} at step {start_step}")
        monitor.advance(start_step)
    history = StepLog(output_dir / "train_history.jsonl", start_step, enabled=dist.is_main)
    pair_log = StepLog(output_dir / f"pair_ids.rank{dist.rank}.jsonl", start_step, enabled=train_cfg.log_pair_ids)
    stop = StopRequest()

    def run_eval(step: int) -> dict:
        results = evaluate(policy, reference, objective, eval_examples, train_cfg.eval_batch_size,
                           pad_id, dist.rank, dist.world_size)
        answer_metrics, generations = generation_report(policy, tokenizer, eval_examples, config,
                                                        dist.rank, dist.world_size)
        results.update(answer_metrics)
        monitor.log(step, results)
        if generations:
            monitor.log_text("eval/generations", generations_markdown(generations), step)
        if results:
            monitor.message(_log_line(step, results))
        return {**results, "generations": generations}

    def checkpoint(step: int) -> Path:
        return save_checkpoint(policy, output_dir, step, dist.rank, dist.is_main, sampler.state_dict(step),
                               config, train_cfg.keep_last)

    started = time.perf_counter()
    outcome, faults, skipped, saved = "completed", 0, 0, None
    for step in range(start_step, train_cfg.max_steps):
        micro_batches = [collate([train_examples[i] for i in indices], pad_id, filler)
                         for indices in sampler.micro_batches(step)]
        pair_log.write({"step": step + 1, "epoch": sampler.epoch_of(step),
                        "ids": [pair_id for batch in micro_batches for pair_id in batch["pair_ids"]]})
        lr = policy.get_lr()[0]  # the scheduler moves on inside the step
        sums, totals = train_step(policy, reference, objective, micro_batches, dist.world_size)
        monitor.count(float(totals.input_tokens), float(totals.pairs))
        done = step + 1
        # DeepSpeed skips the update on every rank when the global gradient norm is not finite.
        faults = 0 if policy.was_step_applied() else faults + 1
        skipped += faults > 0
        if faults:
            monitor.message(f"[plot_ds] step {done}: non-finite loss or gradient; the update was skipped on "
                            f"every rank ({faults} in a row, at most {train_cfg.max_consecutive_faults})")
        if done % train_cfg.log_every == 0 or done == train_cfg.max_steps or faults:
            metrics = reduce_metrics(sums)
            metrics["lr"] = lr
            grad_norm = policy.get_global_grad_norm()
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            metrics["faults/skipped_steps"] = float(skipped)
            if dist.is_main:
                metrics.update(monitor.throughput())
            monitor.log(done, metrics)
            history.write({"step": done, **metrics})
        monitor.advance()
        if faults >= train_cfg.max_consecutive_faults:
            # Skipped updates left the weights as they were before the first fault.
            saved = checkpoint(done)
            monitor.message(f"[plot_ds] stopping: {faults} consecutive non-finite steps (last {done}). The "
                            f"weights in {saved} are those from before step {done - faults + 1}. Lower "
                            f"train.lr, check the data around these steps, or use fp32/bf16 over fp16.")
            outcome = "faults"
            break
        if stop.agreed(policy.device):
            saved = checkpoint(done)
            monitor.message(f"[plot_ds] {stop.signal_name or 'a stop signal on another rank'}: checkpoint "
                            f"{saved} written at step {done}; exiting with {EXIT_PREEMPTED} (requeue to resume)")
            outcome = "preempted"
            break
        if train_cfg.save_every and done % train_cfg.save_every == 0 and done != train_cfg.max_steps:
            saved = checkpoint(done)
        if train_cfg.eval_every and done % train_cfg.eval_every == 0 and done != train_cfg.max_steps:
            run_eval(done)
    stop.restore()
    elapsed = time.perf_counter() - started
    history.close()
    pair_log.close()
    summary = {"outcome": outcome, "train_seconds": elapsed, "checkpoint": str(saved) if saved else None}
    if outcome != "completed":
        monitor.close()
        return summary

    eval_results = run_eval(train_cfg.max_steps)
    if train_cfg.save_checkpoint:
        saved = checkpoint(train_cfg.max_steps)
    exported = (export_hf_model(policy, tokenizer, output_dir / "final_model", dist.is_main)
                if train_cfg.export_final else None)
    barrier()
    monitor.close()
    summary.update(eval=eval_results, checkpoint=str(saved) if saved else None)
    if dist.is_main:
        (output_dir / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
        (output_dir / "train_history.json").write_text(json.dumps(history.records(), indent=2))
        print(f"[plot_ds] done: steps {start_step + 1}-{train_cfg.max_steps} in {elapsed:.1f}s", flush=True)
        print(f"[plot_ds] run directory:  {output_dir.resolve()}", flush=True)
        if saved:
            print(f"[plot_ds] checkpoint:     {Path(saved).resolve()}", flush=True)
        if exported:
            print(f"[plot_ds] final model:    {exported.resolve()}  (Hugging Face, safetensors)", flush=True)
        if train_cfg.tensorboard:
            print(f"[plot_ds] TensorBoard:    tensorboard --logdir {(output_dir / 'tensorboard').resolve()}",
                  flush=True)
        print(f"[plot_ds] eval results:   {(output_dir / 'eval_results.json').resolve()}", flush=True)
    return summary
