"""Preference pairs: loading, tokenisation, batching and the global-batch sampler.

A pair is {"prompt", "chosen", "rejected"} strings (plus an "id"). Tokenised, chosen and rejected
share the prompt tokens; labels cover the response tokens only (EOS included).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .assets import BUILTIN_DATASETS, BUILTIN_PREFIX, champ_pairs

IGNORE_INDEX = -100
PAIR_FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """Bad input data; the message names the file, the record and the field."""


# ---------------------------------------------------------------------------------------- loading
def load_pairs(source: str) -> list[dict]:
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_DATASETS:
            raise DataError(f"unknown built-in dataset '{name}'; known: {', '.join(BUILTIN_DATASETS)}")
        return champ_pairs()
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (expected .json or .jsonl with fields "
                        f"{', '.join(PAIR_FIELDS)}, or builtin:champ)")
    if path.suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    records.append((f"{path}:{line_no}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg}); fix or remove "
                                    f"the line") from None
    elif path.suffix == ".json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON at line {err.lineno} ({err.msg})") from None
        if not isinstance(loaded, list):
            raise DataError(f"{path}: expected a JSON list of pair objects")
        records = [(f"{path}[{i}]", record) for i, record in enumerate(loaded)]
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .json or .jsonl)")
    return [_checked_pair(where, record) for where, record in records]


def _checked_pair(where: str, record) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with fields {', '.join(PAIR_FIELDS)}")
    for name in PAIR_FIELDS:
        value = record.get(name)
        if not isinstance(value, str):
            problem = "is missing" if name not in record else f"must be a string, got {type(value).__name__}"
            raise DataError(f"{where}: field '{name}' {problem}")
        if name != "prompt" and not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    return {**record, "id": str(record.get("id", where)), "source": where}


def split_pairs(pairs: list[dict], eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Carve a held-out set off with a fixed seed, identical on every rank."""
    if eval_size >= len(pairs):
        raise DataError(f"data.eval_size ({eval_size}) must be smaller than the {len(pairs)} pairs")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:eval_size])
    return ([p for i, p in enumerate(pairs) if i not in held_out],
            [p for i, p in enumerate(pairs) if i in held_out])


# ------------------------------------------------------------------------------------ tokenising
@dataclass
class TokenizedPair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def render_prompt(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return prompt


def tokenize_pair(tokenizer, pair: dict, max_length: int, max_prompt_length: int) -> TokenizedPair:
    """Prompt truncated from the left, responses from the right; EOS ends every response."""
    prompt_ids = tokenizer(render_prompt(tokenizer, pair["prompt"]), add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        # The first response token needs a position that predicts it.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prompt_ids = [start]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chosen = tokenizer(pair["chosen"], add_special_tokens=False)["input_ids"] + eos
    rejected = tokenizer(pair["rejected"], add_special_tokens=False)["input_ids"] + eos
    truncated = len(prompt_ids) > max_prompt_length
    prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    truncated |= len(chosen) > room or len(rejected) > room
    return TokenizedPair(pair["id"], prompt_ids, chosen[:room], rejected[:room], truncated)


def tokenize_pairs(tokenizer, pairs: list[dict], max_length: int, max_prompt_length: int) -> list[TokenizedPair]:
    return [tokenize_pair(tokenizer, p, max_length, max_prompt_length) for p in pairs]


def prepare_datasets(data_config, tokenizer) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Training and held-out pairs, tokenised; ``data_config`` is the ``data`` config section."""
    pairs = load_pairs(data_config.source)
    if data_config.eval_source:
        train_pairs, eval_pairs = pairs, load_pairs(data_config.eval_source)
    elif data_config.eval_size:
        train_pairs, eval_pairs = split_pairs(pairs, data_config.eval_size, data_config.seed)
    else:
        train_pairs, eval_pairs = pairs, []
    tokenize = lambda ps: tokenize_pairs(tokenizer, ps, data_config.max_length, data_config.max_prompt_length)
    return tokenize(train_pairs), tokenize(eval_pairs)


def collate(examples: list[TokenizedPair], pad_id: int) -> dict:
    """Chosen rows first, then rejected rows, right-padded: one forward for both."""
    sequences, labels = [], []
    for response_of in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            response = getattr(ex, response_of)
            sequences.append(ex.prompt_ids + response)
            labels.append([IGNORE_INDEX] * len(ex.prompt_ids) + response)
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(zip(sequences, labels)):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        label_ids[row, :len(lab)] = torch.tensor(lab)
        attention_mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids,
            "pair_ids": [ex.id for ex in examples], "counts": example_counts(examples)}


def example_counts(examples: list[TokenizedPair]) -> torch.Tensor:
    """[pairs, chosen response tokens, rejected response tokens, input tokens, batches] of some
    pairs (one batch): the denominators of the global means (see ``objectives.GlobalTotals``)."""
    chosen = sum(len(ex.chosen_ids) for ex in examples)
    rejected = sum(len(ex.rejected_ids) for ex in examples)
    prompts = sum(len(ex.prompt_ids) for ex in examples)
    return torch.tensor([len(examples), chosen, rejected, 2 * prompts + chosen + rejected, 1],
                        dtype=torch.float64)


# ---------------------------------------------------------------------------------------- sampling
class GlobalBatchSampler:
    """Which pairs this rank uses at each optimizer step.

    Every epoch is a seeded permutation cut into global batches of
    ``micro_batch_size * gradient_accumulation_steps * world_size`` pairs; rank r takes the r-th
    contiguous share and cuts it into micro-batches. The global batch of a step therefore does not
    depend on how it is split, and a position is just the step number (exact resume).
    The ``len % global_batch`` pairs left over by each epoch's permutation are not used in that
    epoch (a different subset each epoch); ``dropped_per_epoch`` reports how many.
    """

    def __init__(self, num_pairs: int, micro_batch_size: int, gradient_accumulation_steps: int,
                 rank: int, world_size: int, seed: int):
        self.num_pairs = num_pairs
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch_size = micro_batch_size * gradient_accumulation_steps * world_size
        if num_pairs < self.global_batch_size:
            raise DataError(f"{num_pairs} training pairs cannot fill one global batch of "
                            f"{self.global_batch_size} (micro_batch_size x gradient_accumulation_steps "
                            f"x ranks); lower the batch settings or add data")
        self.steps_per_epoch = num_pairs // self.global_batch_size
        self.dropped_per_epoch = num_pairs - self.steps_per_epoch * self.global_batch_size
        self._epoch, self._order = None, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(self.num_pairs, generator=generator).tolist()
            self._epoch = epoch
        return self._order

    def global_batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch_size
        return self._permutation(epoch)[start:start + self.global_batch_size]

    def micro_batches(self, step: int) -> list[list[int]]:
        share = self.global_batch_size // self.world_size
        mine = self.global_batch(step)[self.rank * share:(self.rank + 1) * share]
        m = self.micro_batch_size
        return [mine[i * m:(i + 1) * m] for i in range(self.gradient_accumulation_steps)]
