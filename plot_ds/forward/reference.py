"""The reference side of a micro-batch, one explicit object: a frozen engine (``LiveReference``: a
reference model, or the policy's base with its adapters off) or log-probs computed once before
training (``CachedReference``, from ``reference_cache``). Both answer ``outputs``."""

from __future__ import annotations

import torch

from .logprobs import move_tokens, to_device

from ..pair_batch import PairLogps, PairOutputs, ResponseTokens
from ..pair_batch import PairBatch
from .pair_forward import ForwardLayout, forward_pairs


class LiveReference:
    """A no-grad forward of ``engine`` (laid out as ``layout``) for every micro-batch."""

    def __init__(self, engine, layout: ForwardLayout = ForwardLayout()):
        self.engine, self.layout = engine, layout

    def outputs(self, batch: PairBatch, keep_logits: bool, device, split: str = "train") -> PairOutputs:
        with torch.no_grad():
            return forward_pairs(self.engine, batch, keep_logits, layout=self.layout)

    def destroy(self) -> None:
        self.engine.destroy()


class CachedReference:
    """Per-pair summed log-probs (chosen, rejected) of every pair of each split, ``[pairs, 2]``,
    looked up by each batch's ``example_index``: no reference model in memory. No logits."""

    def __init__(self, splits: dict[str, torch.Tensor]):
        self.splits = splits

    def outputs(self, batch: PairBatch, keep_logits: bool, device, split: str = "train") -> PairOutputs:
        if keep_logits:
            raise ValueError("cached reference log-probs hold no logits (reference.mode: engine gives them)")
        tokens = move_tokens(ResponseTokens.of(batch.labels), device)
        chosen, rejected = to_device(self.splits[split][batch.example_index].T.contiguous(), device)
        row_tokens = tokens.row_counts()
        return PairOutputs(
            PairLogps(chosen, rejected, row_tokens[: batch.pairs], row_tokens[batch.pairs :]), None, tokens
        )

    def destroy(self) -> None:
        """Nothing to free."""


Reference = LiveReference | CachedReference
