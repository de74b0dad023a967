"""A model's forward over a collated batch of pairs: chosen and rejected rows together, sharing
their prompts (``prompt_sharing``) or packed into one row (``packing``), the LM head only on the
positions that predict a response token (a pre-hook hands it those hidden states: prompt and
padding positions never reach the vocabulary projection), then ``logprobs.pair_outputs``.

How an engine lays out its rows (``RowLayout``: prompt sharing, packing or plain padded rows) is
decided when it is built (``engine``) and handed here explicitly.
"""
from __future__ import annotations

import torch

from .logprobs import PairLogps, PairOutputs, ResponseTokens, pair_outputs, to_device, with_head_input
from .packing import Packing, packed_logits
from .prompt_sharing import PromptSharing, shared_prompt_logits

RowLayout = PromptSharing | Packing | None


def response_logits(model, input_ids, attention_mask, tokens: ResponseTokens) -> torch.Tensor:
    """[N, V] logits at the response positions of full rows."""
    return with_head_input(model, tokens.select, input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).logits


def head_logits(model, batch: dict, layout: RowLayout = None) -> tuple[torch.Tensor, ResponseTokens]:
    """The [N, V] logits at the response positions of a collated batch, and those positions."""
    device = model.device
    cpu_tokens = ResponseTokens.of(batch["labels"])
    logits = None
    if isinstance(layout, Packing):
        logits = packed_logits(model, batch, cpu_tokens, device, layout)
    elif isinstance(layout, PromptSharing):
        logits = shared_prompt_logits(model, batch, cpu_tokens, device, layout)
    tokens = cpu_tokens.to(device)
    if logits is None:
        logits = response_logits(model, to_device(batch["input_ids"], device),
                                 to_device(batch["attention_mask"], device), tokens)
    return logits, tokens


def forward_pairs(model, batch: dict, keep_logits: bool, top_k: int = 0, layout: RowLayout = None) -> PairOutputs:
    """One forward over the chosen and rejected rows of a collated batch. ``keep_logits`` keeps the
    [N, V] logits; ``top_k`` > 0 reads each position's top-k ``SupportLogits`` in the log-prob pass;
    ``layout``: each prompt computed once, or the rows packed."""
    return pair_outputs(*head_logits(model, batch, layout), keep_logits, top_k)


def reference_pairs(engine, batch: dict, keep_logits: bool, device, layout: RowLayout = None) -> PairOutputs | None:
    """The reference side of a batch, on ``device`` (the policy's): precomputed log-probs when the
    batch carries them, else a no-grad forward of the reference engine (None when the objective
    needs no reference)."""
    if "reference_logps" in batch:
        tokens = ResponseTokens.of(batch["labels"]).to(device)
        chosen, rejected = to_device(batch["reference_logps"], device)
        counts = tokens.row_counts()
        n = chosen.shape[0]
        return PairOutputs(PairLogps(chosen, rejected, counts[:n], counts[n:]), None, tokens)
    if engine is None:
        return None
    with torch.no_grad():
        return forward_pairs(engine, batch, keep_logits, layout=layout)
