"""Collating tokenised pairs into one ``PairBatch``: chosen rows first, then rejected rows."""

from __future__ import annotations

import torch

from ..pair_batch import IGNORE_INDEX, PairBatch, PairCounts
from .tokenize import TokenizedPair


def example_counts(examples: list[TokenizedPair]) -> PairCounts:
    """The denominators of the global means that ``examples`` (one batch) contribute."""
    chosen = sum(len(ex.chosen_ids) for ex in examples)
    rejected = sum(len(ex.rejected_ids) for ex in examples)
    prompts = sum(len(ex.prompt_ids) for ex in examples)
    return PairCounts(
        pairs=len(examples),
        chosen_tokens=chosen,
        rejected_tokens=rejected,
        input_tokens=2 * prompts + chosen + rejected,
        micro_batches=1,
    )


def collate(
    examples: list[TokenizedPair], pad_id: int, filler: TokenizedPair | None = None, indices: list[int] | None = None
) -> PairBatch:
    """Right-padded rows, labels on response tokens only; ``indices``: each pair's index in its
    dataset (``PairBatch.example_index``).

    An empty ``examples`` (a rank with no pair left in the last global batch of an epoch) becomes
    the ``filler`` pair, flagged: ZeRO-3 needs every rank in every forward, but it must not count.
    """
    is_filler = not examples
    if is_filler:
        if filler is None:
            raise ValueError("an empty batch needs a filler pair")
        examples, indices = [filler], [0]
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
        input_ids[row, : len(seq)] = torch.tensor(seq)
        label_ids[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(seq)] = 1
    return PairBatch(
        input_ids,
        attention_mask,
        label_ids,
        pair_ids=[] if is_filler else [ex.id for ex in examples],
        counts=PairCounts(micro_batches=1) if is_filler else example_counts(examples),
        filler=is_filler,
        example_index=None if indices is None else torch.tensor(indices, dtype=torch.long),
    )
