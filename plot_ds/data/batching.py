"""Collating tokenised pairs into one batch: chosen rows first, then rejected rows."""
from __future__ import annotations

import torch

from .tokenize import TokenizedPair

IGNORE_INDEX = -100


def example_counts(examples: list[TokenizedPair]) -> torch.Tensor:
    """[pairs, chosen response tokens, rejected response tokens, input tokens, batches] of some
    pairs (one batch): the denominators of the global means (see ``objectives.GlobalTotals``)."""
    chosen = sum(len(ex.chosen_ids) for ex in examples)
    rejected = sum(len(ex.rejected_ids) for ex in examples)
    prompts = sum(len(ex.prompt_ids) for ex in examples)
    return torch.tensor([len(examples), chosen, rejected, 2 * prompts + chosen + rejected, 1],
                        dtype=torch.float64)


def collate(examples: list[TokenizedPair], pad_id: int, filler: TokenizedPair | None = None) -> dict:
    """Right-padded rows, labels on response tokens only.

    An empty ``examples`` (a rank with no pair left in the last global batch of an epoch) becomes
    the ``filler`` pair with ``weight`` 0: ZeRO-3 needs every rank in every forward, but it must
    not count.
    """
    weight = 1.0
    if not examples:
        if filler is None:
            raise ValueError("an empty batch needs a filler pair")
        examples, weight = [filler], 0.0
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
    counts = example_counts(examples)
    if weight == 0.0:
        counts[:-1] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids,
             "pair_ids": [ex.id for ex in examples] if weight else [], "counts": counts, "weight": weight}
    if all(ex.reference_chosen is not None for ex in examples):  # precomputed (reference.mode: cache)
        batch["reference_logps"] = torch.tensor([[ex.reference_chosen for ex in examples],
                                                 [ex.reference_rejected for ex in examples]])
    return batch
