"""Response log-probabilities from one forward over chosen and rejected rows, without the full
[batch, length, vocab] logits.

The LM head runs only on the positions that predict a response token (a pre-hook hands it those
hidden states): prompt and padding positions never reach the vocabulary projection. Log-probs of
the targets come from ``TargetLogProb``, float32 a chunk of positions at a time, which keeps only
the [N, V] logits for its backward (no float32 copy, no saved softmax).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX


@dataclass
class ResponseTokens:
    """The N response positions of a batch: ``logits[rows, cols]`` predicts ``targets``."""
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    n_rows: int

    @classmethod
    def of(cls, labels: torch.Tensor) -> "ResponseTokens":
        """From labels (prompt and padding = IGNORE_INDEX). Works where the labels are: CPU labels
        give the positions without waiting for the device."""
        shifted = labels[:, 1:]
        rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        return cls(rows, cols, shifted[rows, cols], labels.shape[0])

    def to(self, device) -> "ResponseTokens":
        return ResponseTokens(self.rows.to(device, non_blocking=True), self.cols.to(device, non_blocking=True),
                              self.targets.to(device, non_blocking=True), self.n_rows)

    def select(self, per_position: torch.Tensor) -> torch.Tensor:
        """[rows, length, ...] -> [N, ...]: the entries at the response positions."""
        return per_position[self.rows, self.cols]

    def row_sums(self, values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(self.n_rows).index_add(0, self.rows, values)

    def row_counts(self) -> torch.Tensor:
        return torch.zeros(self.n_rows, dtype=torch.long, device=self.rows.device).index_add(
            0, self.rows, torch.ones_like(self.rows))


class TargetLogProb(torch.autograd.Function):
    """log softmax(logits)[target] per row of [N, V] logits, float32, in chunks of rows.

    Saves the logits (in their own dtype) and one float per row; the backward recomputes each
    chunk's softmax, so no [N, V] float32 tensor outlives a chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = logits.shape[0]
        logsumexp = torch.empty(n, device=logits.device, dtype=torch.float32)
        picked = torch.empty(n, device=logits.device, dtype=torch.float32)
        for start in range(0, n, chunk):
            part = logits[start:start + chunk].float()
            logsumexp[start:start + chunk] = part.logsumexp(-1)
            picked[start:start + chunk] = part.gather(-1, targets[start:start + chunk, None]).squeeze(-1)
        ctx.save_for_backward(logits, targets, logsumexp)
        ctx.chunk = chunk
        return picked - logsumexp

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets, logsumexp = ctx.saved_tensors
        grad = torch.empty_like(logits)
        grad_output = grad_output.float()
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z)
            part = (logits[rows].float() - logsumexp[rows, None]).exp_().mul_(-grad_output[rows, None])
            part.scatter_add_(-1, targets[rows, None], grad_output[rows, None])
            grad[rows] = part
        return grad, None, None


def target_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return TargetLogProb.apply(logits, targets, chunk)


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


@dataclass
class PairOutputs:
    """A model's outputs on a collated batch: log-probs, and the [N, V] logits at the response
    positions when a loss needs them."""
    logps: PairLogps
    logits: torch.Tensor | None
    tokens: ResponseTokens


def response_logits(model, input_ids, attention_mask, tokens: ResponseTokens) -> torch.Tensor:
    """[N, V] logits at the response positions. The model's own forward runs (ZeRO-3's hooks and
    all); a pre-hook on the output embedding hands the LM head only the N hidden states."""
    module = getattr(model, "module", model)
    head = module.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _, args: (tokens.select(args[0]), *args[1:]))
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        hook.remove()


def forward_pairs(model, batch: dict, keep_logits: bool) -> PairOutputs:
    """One forward over the chosen and rejected rows of a collated batch together."""
    device = model.device
    tokens = ResponseTokens.of(batch["labels"]).to(device)
    logits = response_logits(model, batch["input_ids"].to(device, non_blocking=True),
                             batch["attention_mask"].to(device, non_blocking=True), tokens)
    logps = PairLogps.from_rows(tokens.row_sums(target_logps(logits, tokens.targets)), tokens.row_counts())
    return PairOutputs(logps, logits if keep_logits else None, tokens)


def reference_pairs(engine, batch: dict, keep_logits: bool, device) -> PairOutputs | None:
    """The reference side of a batch, on ``device`` (the policy's): precomputed log-probs when the
    batch carries them, else a no-grad forward of the reference engine (None when the objective
    needs no reference)."""
    if "reference_logps" in batch:
        tokens = ResponseTokens.of(batch["labels"]).to(device)
        chosen, rejected = batch["reference_logps"].to(device)
        counts = tokens.row_counts()
        n = chosen.shape[0]
        return PairOutputs(PairLogps(chosen, rejected, counts[:n], counts[n:]), None, tokens)
    if engine is None:
        return None
    with torch.no_grad():
        return forward_pairs(engine, batch, keep_logits)
