"""A model measured against the starting model on the held-out pairs, by metrics that mean the same
for every objective (an SFT or SimPO run has no implicit DPO reward of its own): the records of
``compare_eval.json``, one per held-out pair and one per generation, so that ``stats`` can compare
runs pair by pair.

Per held-out pair (the reference of the implicit reward is the starting model):
  preference_accuracy   chosen beats rejected in length-normalised log-prob (ties count 1/2)
  reward_accuracy       the DPO implicit reward beta * (log-ratio chosen - log-ratio rejected) > 0
  reward_margin         that reward
  chosen_nll            the chosen response's negative log-likelihood per token
  chosen_nll_change     chosen_nll minus the starting model's (DPO tends to raise it)
  kl_to_start           KL(model || starting model) per token over the chosen response's positions
Per generation (greedy, the first eval.generations held-out prompts, the same for every model):
  length (tokens), distinct_1, distinct_2, repeated_4gram_share, start_perplexity (of the generated
  tokens under the starting model), answer_correct (where the pair has a reference answer), reward
  (with eval.reward_model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.answers import answer_matches
from ..atomic import write_text_atomically
from ..config import Config
from ..data import TokenizedPair, eval_shards, prepare_datasets
from ..distributed.process_group import barrier, init_distributed
from ..engine.ds_config import resolve_ds_config
from ..engine.engines import build_frozen_engine
from ..training.evaluation import generate
from ..engine.models import load_tokenizer
from ..forward.micro_batch import PairModels, forward_micro_batch
from ..pair_batch import ForwardNeeds
from ..training.run import indexed_batch
from .text_metrics import distinct_n, repeated_ngram_share


def kl_per_row(
    logits: torch.Tensor, start_logits: torch.Tensor, rows: torch.Tensor, n_rows: int, chunk: int = 256
) -> torch.Tensor:
    """Per row: the sum over its positions of KL(softmax(logits) || softmax(start_logits)), float32,
    a chunk of positions at a time."""
    sums = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    for begin in range(0, logits.shape[0], chunk):
        log_p = torch.log_softmax(logits[begin : begin + chunk].float(), dim=-1)
        log_q = torch.log_softmax(start_logits[begin : begin + chunk].float(), dim=-1)
        # Non-negative in exact arithmetic; float32 rounding can leave identical rows at -1e-8.
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
        sums.index_add_(0, rows[begin : begin + chunk], kl)
    return sums


def pair_records(batch: dict, model_out, start_out, beta: float) -> list[dict]:
    """The per-pair metrics of one collated batch from both models' outputs (with logits)."""
    n = len(batch.pair_ids)
    if n == 0:  # a filler batch
        return []
    kl = kl_per_row(model_out.logits, start_out.logits, model_out.tokens.rows, model_out.tokens.n_rows)
    records = []
    for i, pair_id in enumerate(batch.pair_ids):
        m, s = model_out.logps, start_out.logps
        chosen_tokens, rejected_tokens = float(m.chosen_tokens[i]), float(m.rejected_tokens[i])
        chosen, rejected = float(m.chosen[i]), float(m.rejected[i])
        start_chosen, start_rejected = float(s.chosen[i]), float(s.rejected[i])
        normalised = chosen / chosen_tokens - rejected / rejected_tokens
        margin = beta * ((chosen - start_chosen) - (rejected - start_rejected))
        records.append(
            {
                "id": pair_id,
                "chosen_logp": chosen,
                "rejected_logp": rejected,
                "chosen_tokens": chosen_tokens,
                "rejected_tokens": rejected_tokens,
                "preference_accuracy": 1.0 if normalised > 0 else 0.5 if normalised == 0 else 0.0,
                "reward_accuracy": float(margin > 0),
                "reward_margin": margin,
                "chosen_nll": -chosen / chosen_tokens,
                "chosen_nll_change": (start_chosen - chosen) / chosen_tokens,
                "kl_to_start": float(kl[i]) / chosen_tokens,
            }
        )
    return records


WITH_LOGITS = ForwardNeeds(policy_logits=True)  # the KL to the start reads every position's distribution


@torch.no_grad()
def held_out_records(
    model, model_layout, start, start_layout, examples, batch_size, pad_id, beta, rank, world_size
) -> list[dict]:
    """Per-pair records of every held-out pair, computed in shards and gathered on every rank."""
    mine = []
    for indices in eval_shards(len(examples), batch_size, rank, world_size):
        batch = indexed_batch(examples, indices, pad_id)
        model_out = forward_micro_batch(PairModels(model, model_layout), batch, WITH_LOGITS).policy
        start_out = (
            model_out
            if start is model
            else forward_micro_batch(PairModels(start, start_layout), batch, WITH_LOGITS).policy
        )
        mine.extend(pair_records(batch, model_out, start_out, beta))
    return gathered_in_order(mine, [ex.id for ex in examples], world_size)


def gathered_in_order(mine: list[dict], ids: list[str], world_size: int) -> list[dict]:
    if world_size > 1:
        import torch.distributed as torch_dist

        parts: list = [None] * world_size
        torch_dist.all_gather_object(parts, mine)
        mine = [record for part in parts for record in part]
    by_id = {record["id"]: record for record in mine}
    return [by_id[i] for i in ids]


@torch.no_grad()
def start_perplexities(start, examples, generations, batch_size, pad_id, rank, world_size) -> list[float | None]:
    """exp(mean NLL) of each generation's tokens given its prompt, under the starting model."""
    scored = [
        TokenizedPair(ex.id, ex.prompt_ids, tokens, tokens) for ex, tokens in zip(examples, generations) if tokens
    ]
    mine = []
    for indices in eval_shards(len(scored), batch_size, rank, world_size) if scored else []:
        batch = indexed_batch(scored, indices, pad_id)
        logps = forward_micro_batch(PairModels(start), batch, ForwardNeeds()).policy.logps
        mine.extend(
            {"id": pair_id, "value": float(torch.exp(-logps.chosen[i] / logps.chosen_tokens[i]))}
            for i, pair_id in enumerate(batch.pair_ids)
        )
    values = {r["id"]: r["value"] for r in gathered_in_order(mine, [p.id for p in scored], world_size)}
    return [values.get(ex.id) for ex in examples]


def load_reward_model(path: str, trust_remote_code: bool):
    """A Hugging Face sequence-classification folder and its tokenizer, on this rank's device.
    Loaded before any ZeRO-3 engine: transformers would otherwise build it under zero.Init (its
    weights partitioned, and across ranks that do not all load it)."""
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
    return tokenizer, model.to(get_accelerator().current_device_name()).eval()


@torch.no_grad()
def reward_scores(reward_model, prompts: list[str], texts: list[str]) -> list[float]:
    """The scalar reward (first logit) of each prompt + generation, one text at a time so that no
    padding convention matters."""
    tokenizer, model = reward_model
    return [
        float(model(**tokenizer(prompt + text, return_tensors="pt", truncation=True).to(model.device)).logits[0, 0])
        for prompt, text in zip(prompts, texts)
    ]


def generation_records(
    model, start, tokenizer, examples, config: Config, rank, world_size, reward_model=None
) -> list[dict]:
    shown = examples[: config.eval.generations]
    if not shown:
        return []
    size, pad_id = config.train.eval_batch_size, tokenizer.pad_token_id
    outputs = generate(model, shown, pad_id, tokenizer.eos_token_id, config.eval.max_new_tokens, rank, world_size, size)
    perplexities = start_perplexities(start, shown, outputs, size, pad_id, rank, world_size)
    records = []
    for example, tokens, perplexity in zip(shown, outputs, perplexities):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        record = {
            "id": example.id,
            "prompt": tokenizer.decode(example.prompt_ids, skip_special_tokens=True),
            "generation": text,
            "length": float(len(tokens)),
            "distinct_1": distinct_n(text, 1),
            "distinct_2": distinct_n(text, 2),
            "repeated_4gram_share": repeated_ngram_share(text, 4),
            "start_perplexity": perplexity,
        }
        if example.answer:
            record["answer_correct"] = float(answer_matches(text, example.answer))
        records.append(record)
    if reward_model is not None:
        rewards = reward_scores(reward_model, [r["prompt"] for r in records], [r["generation"] for r in records])
        for record, reward in zip(records, rewards):
            record["reward"] = reward
    return records


def evaluate_against_start(config: Config, model_path: str, start_path: str, output: Path) -> dict:
    """Both models as frozen engines (one, when they are the same), the held-out pairs of
    ``config``; writes and returns the report."""
    dist = init_distributed()
    config.deepspeed.config, ds_config = resolve_ds_config(config, dist.world_size)
    tokenizer = load_tokenizer(config)
    _, examples, _ = prepare_datasets(config.data, tokenizer, preparer=dist.local_rank == 0, sync=barrier)
    if not examples:
        from ..data import DataError

        raise DataError("no held-out pairs to compare on: set data.eval_size (or data.eval_source/eval_split)")
    reward_model = (
        load_reward_model(config.eval.reward_model, config.model.trust_remote_code)
        if config.eval.reward_model and dist.is_main
        else None
    )
    model, model_layout = build_frozen_engine(config, ds_config, model_path)
    start, start_layout = (
        (model, model_layout) if model_path == start_path else build_frozen_engine(config, ds_config, start_path)
    )
    pairs = held_out_records(
        model,
        model_layout,
        start,
        start_layout,
        examples,
        config.train.eval_batch_size,
        tokenizer.pad_token_id,
        config.objective.beta,
        dist.rank,
        dist.world_size,
    )
    generations = generation_records(
        model, start, tokenizer, examples, config, dist.rank, dist.world_size, reward_model
    )
    report = {
        "model": str(model_path),
        "start_model": str(start_path),
        "objective": config.objective.label,
        "plot": config.plot.active,
        "held_out_ids": [ex.id for ex in examples],
        "pairs": pairs,
        "generations": generations,
    }
    if dist.is_main:
        write_text_atomically(Path(output), json.dumps(report, indent=2))
    return report
