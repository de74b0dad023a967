"""Held-out evaluation: the objective's loss, rewards and log-probs over all held-out pairs, and
greedy generations with final-answer accuracy where the data has reference answers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..data.answers import answer_matches, extract_final_answer
from ..atomic import write_text_atomically
from ..data import TokenizedPair, eval_shards, example_counts
from ..forward import sequence_parallel
from ..forward.micro_batch import micro_batch_results
from .monitoring import reduce_metrics
from ..pair_batch import GlobalTotals
from .run import indexed_batch, setup_run


@torch.no_grad()
def evaluate(run, examples: list[TokenizedPair], split: str = "eval") -> dict[str, float]:
    """The objective's metrics over ``examples`` (the held-out pairs of ``split``), as global means
    over all ranks, named ``eval/<metric>``. ``run``: a ``run.Run``. A term defined over the batch
    (AOT) takes all held-out pairs as its batch."""
    if not examples:
        return {}
    policy, dist = run.policy, run.dist
    was_training = policy.training
    policy.eval()
    size = run.config.train.eval_batch_size
    shards = eval_shards(len(examples), size, dist.data_rank, dist.data_ranks)
    # Every rank counts all held-out pairs; the per-batch metrics are means over every rank's batches.
    counts = replace(example_counts(examples), micro_batches=len(shards) * dist.world_size)
    totals = GlobalTotals.from_counts(counts, policy.device)
    batches = [indexed_batch(examples, indices, run.pad_id) for indices in shards]
    sums: dict[str, torch.Tensor] = {}
    for result in micro_batch_results(run.models(split), batches, run.objective, totals, size, dist.rank):
        for name, value in result.metrics.items():
            sums[name] = sums.get(name, 0.0) + value
    policy.train(was_training)
    return {f"eval/{name}": value for name, value in reduce_metrics(sums).items()}


# ------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate(
    policy,
    examples: list[TokenizedPair],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    rank: int,
    world_size: int,
    batch_size: int,
) -> list[list[int]]:
    """Greedy continuations of the examples' prompts, computed in shards on every rank (ZeRO-3
    ranks generate in lockstep: synced_gpus) and gathered on every rank, in order."""
    import torch.distributed as torch_dist

    model = policy.module if hasattr(policy, "module") else policy
    synced = world_size > 1
    was_training = model.training
    model.eval()
    mine: dict[int, list[int]] = {}
    for indices in eval_shards(len(examples), batch_size, rank, world_size):
        prompts = [examples[i].prompt_ids for i in (indices or [0])]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding: continuations start together
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        output = model.generate(
            input_ids=input_ids.to(policy.device),
            attention_mask=attention_mask.to(policy.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            synced_gpus=synced,
            use_cache=True,
        )
        for row, index in enumerate(indices):
            tokens = output[row, width:].tolist()
            mine[index] = tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
    model.train(was_training)
    if world_size > 1:
        gathered: list = [None] * world_size
        torch_dist.all_gather_object(gathered, mine)
        for part in gathered:
            mine.update(part)
    return [mine[i] for i in range(len(examples))]


def generation_report(
    policy, tokenizer, examples: list[TokenizedPair], config, rank: int, world_size: int
) -> tuple[dict[str, float], list[dict]]:
    """Greedy generations for ``eval.generations`` held-out prompts, and answer accuracy on up to
    ``eval.answer_samples`` held-out pairs that carry a reference answer."""
    with_answers = [ex for ex in examples if ex.answer][: config.eval.answer_samples]
    shown = examples[: config.eval.generations]
    chosen = shown + [ex for ex in with_answers if ex not in shown]
    if not chosen:
        return {}, []
    with sequence_parallel.paused():  # a rank generates its prompts' whole rows
        outputs = generate(
            policy,
            chosen,
            tokenizer.pad_token_id,
            tokenizer.eos_token_id,
            config.eval.max_new_tokens,
            rank,
            world_size,
            config.train.eval_batch_size,
        )
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
    records, correct, extracted = [], 0, 0
    for example, text in zip(chosen, texts):
        record = {
            "id": example.id,
            "prompt": tokenizer.decode(example.prompt_ids, skip_special_tokens=True),
            "generation": text,
        }
        if example in with_answers:
            found = extract_final_answer(text)
            record.update(
                reference_answer=example.answer, extracted_answer=found, correct=answer_matches(text, example.answer)
            )
            correct += record["correct"]
            extracted += found is not None
        records.append(record)
    metrics = {}
    if with_answers:
        metrics = {
            "eval/answer_accuracy": correct / len(with_answers),
            "eval/answer_extracted": extracted / len(with_answers),
            "eval/answer_samples": float(len(with_answers)),
        }
    return metrics, records


def generations_markdown(records: list[dict]) -> str:
    rows = ["| id | prompt (end) | generation | answer |", "| --- | --- | --- | --- |"]
    clean = lambda s: s.replace("|", "\\|").replace("\n", " ")
    for r in records:
        answer = f"{r.get('extracted_answer')} vs {r['reference_answer']}" if "reference_answer" in r else ""
        rows.append(f"| {clean(r['id'])} | {clean(r['prompt'][-200:])} | {clean(r['generation'])} | {clean(answer)} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------ plot-eval
def evaluate_model(config, model_path: str, output: Path) -> dict:
    """Evaluate a saved or exported model on the held-out pairs of ``config``: the objective's
    metrics against the configured reference, and generations with answer accuracy. Writes JSON."""
    run = setup_run(config, frozen_model=model_path)
    results = evaluate(run, run.eval_examples)
    answer_metrics, generations = generation_report(
        run.policy, run.tokenizer, run.eval_examples, config, run.dist.rank, run.dist.world_size
    )
    results.update(answer_metrics)
    report = {
        "model": str(model_path),
        "reference": config.reference.name_or_path or config.model.name_or_path,
        "objective": config.objective.label,
        "held_out_pairs": len(run.eval_examples),
        "metrics": results,
        "generations": generations,
    }
    if run.dist.is_main:
        write_text_atomically(Path(output), json.dumps(report, indent=2))
    return report
