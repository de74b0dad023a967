"""Per-sequence log-probabilities of the response tokens, computed in float32."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX


@dataclass
class PairLogps:
    """Summed response log-probs and response token counts of the pairs of a micro-batch."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def from_rows(cls, logps: torch.Tensor, tokens: torch.Tensor) -> "PairLogps":
        """Rows are chosen responses first, then rejected (see ``data.collate``)."""
        n = logps.shape[0] // 2
        return cls(logps[:n], logps[n:], tokens[:n], tokens[n:])


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, rows_per_chunk: int = 1):
    """Sum of log p(label) over each row's response tokens, and the number of those tokens.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``. The float32 log-softmax is taken a few rows at a
    time so that only ``rows_per_chunk x length x vocab`` float32 values exist at once, whatever
    the model's dtype.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    sums = []
    for start in range(0, logits.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        chunk = logits[rows, :-1].float()
        token_logps = chunk.gather(-1, safe_targets[rows].unsqueeze(-1)).squeeze(-1) - chunk.logsumexp(-1)
        sums.append((token_logps * mask[rows]).sum(-1))
    return torch.cat(sums), mask.sum(-1)


@dataclass
class PairOutputs:
    """A model's outputs on a collated batch: log-probs, and the logits when a loss needs them."""
    logps: PairLogps
    logits: torch.Tensor | None
    labels: torch.Tensor


def forward_pairs(model, batch: dict, keep_logits: bool) -> PairOutputs:
    """One forward over the chosen and rejected rows of a collated batch together."""
    device = model.device
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps = PairLogps.from_rows(*sequence_logps(logits, labels))
    return PairOutputs(logps, logits if keep_logits else None, labels)


def reference_pairs(engine, batch: dict, keep_logits: bool, device) -> PairOutputs | None:
    """The reference side of a batch, on ``device`` (the policy's): precomputed log-probs when the
    batch carries them, else a no-grad forward of the reference engine (None when the objective
    needs no reference)."""
    if "reference_logps" in batch:
        labels = batch["labels"]
        chosen, rejected = batch["reference_logps"].to(device)
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1).to(device)
        n = chosen.shape[0]
        return PairOutputs(PairLogps(chosen, rejected, tokens[:n], tokens[n:]), None, labels)
    if engine is None:
        return None
    with torch.no_grad():
        return forward_pairs(engine, batch, keep_logits)
