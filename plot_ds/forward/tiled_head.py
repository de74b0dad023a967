"""The LM head a tile of positions at a time: each response position's float32 log-prob of its
target, its log-sum-exp and PLOT's top-k support, computed from the hidden states, so that no
[N, V] logits tensor exists in any dtype. The backward recomputes each tile's logits from the
hidden states and the head's weight (one more head matmul) and adds the tile's gradients into
[N, d] and [V, d] tensors. DeepSpeed's ``TiledFusedLogitsLoss`` and Liger's fused linear
cross-entropy do this for a scalar loss; here the outputs are per position (a DPO loss is not a sum
over positions), and PLOT's support comes out of the same tile.

The tiled head replaces the output embedding's ``forward`` for one model forward
(``tiled_head``): the module is still called by the model, so ZeRO-3 gathers its weight for the
forward and again, through the hooks on the module's outputs, for the backward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .logprobs import RowOutputs, tile_gradient

# A tile's float32 logits stay under this many bytes (the head's matmul output in the model's dtype
# and the softmax's temporaries are of the same order). Smaller tiles save a little memory and cost
# matmul efficiency (both measured in docs/benchmarks.md).
TILE_BYTES = 64 * 2**20


def tile_positions(vocab_size: int) -> int:
    return max(16, TILE_BYTES // (4 * vocab_size))


class TiledHeadLogProb(torch.autograd.Function):
    """``hidden [N, d] @ weight [V, d]^T (+ bias)`` -> per row: log softmax[target] (float32) and,
    with ``top_k`` > 0, the logits of the row's top-k ids and its target (float32) and those ids.
    Saves the hidden states, one float per row and the support ids."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tile: int, top_k: int):
        out = RowOutputs.empty(hidden.shape[0], targets, top_k)
        for start in range(0, hidden.shape[0], tile):
            rows = slice(start, start + tile)
            out.read(torch.nn.functional.linear(hidden[rows], weight, bias).float(), targets[rows], rows)
        ctx.save_for_backward(hidden, weight, bias, targets, out.logsumexp, out.support_ids)
        ctx.tile = tile
        ctx.mark_non_differentiable(out.support_ids)
        ctx.set_materialize_grads(False)
        return out.logps, out.support_logits, out.support_ids

    @staticmethod
    def backward(ctx, grad_logps, grad_support, _):
        hidden, weight, bias, targets, logsumexp, support_ids = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # The weight's gradient summed over the tiles in float32 and cast once (a bf16 sum of many
        # tiles would round at every tile): [V, d] float32 for the backward's duration.
        grad_weight = torch.zeros(weight.shape, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros(bias.shape, device=bias.device) if bias is not None and ctx.needs_input_grad[2] else None
        )
        for start in range(0, hidden.shape[0], ctx.tile):
            rows = slice(start, start + ctx.tile)
            part = tile_gradient(
                torch.nn.functional.linear(hidden[rows], weight, bias).float(),
                targets[rows],
                logsumexp[rows],
                support_ids[rows],
                None if grad_logps is None else grad_logps[rows],
                None if grad_support is None else grad_support[rows],
            )
            if grad_hidden is not None:
                grad_hidden[rows] = part.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(part.t(), hidden[rows].float())
            if grad_bias is not None:
                grad_bias.add_(part.sum(0))
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


@dataclass
class TiledOutputs:
    """What the tiled head hands back for the N response positions."""

    logps: torch.Tensor  # [N] float32
    support_ids: torch.Tensor  # [N, k + 1]; [N, 0] without a support
    support_logits: torch.Tensor  # [N, k + 1] float32

    @classmethod
    def unpack(cls, packed: torch.Tensor, top_k: int) -> "TiledOutputs":
        """From the head's packed output: log-probs, support logits, support ids (as floats, exact
        below 2**24)."""
        width = top_k + 1 if top_k else 0
        ids = packed[:, 1 + width :].detach().long()
        return cls(packed[:, 0], ids, packed[:, 1 : 1 + width])


def why_not_tiled(module) -> str | None:
    """Why a model's head cannot be tiled (None where it can): the tiled head computes ``linear`` of
    the hidden states, so a head that is no plain ``nn.Linear`` (an adapter on it), or a model that
    transforms the head's output (a soft cap, a logit scale), keeps the [N, V] head."""
    head = module.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"its output embedding is a {type(head).__name__}, not a plain Linear"
    config = module.config
    if getattr(config, "final_logit_softcapping", None):
        return "it soft-caps its logits (final_logit_softcapping)"
    for name in ("logit_scale", "logits_scaling"):
        if getattr(config, name, 1) not in (None, 1, 1.0):
            return f"it scales its logits ({name})"
    return None


@contextmanager
def tiled_head(model, targets: torch.Tensor, top_k: int, tile: int):
    """While open, the model's output embedding returns, for the rows it is handed, their
    ``TiledOutputs`` packed into one float32 tensor ([rows, 1 + 2 (k + 1)]) in place of their
    logits. It stays the model's output (the model returns it as ``logits``), so ZeRO-3's hooks on
    the module's outputs gather its weight again before the backward."""
    module = getattr(model, "module", model)
    head = module.get_output_embeddings()

    def forward(hidden):
        if hidden.shape[0] == 0:  # a pass that predicts no response token (prompt sharing's first)
            return hidden.new_zeros(0, 2 * (top_k + 1 if top_k else 0) + 1, dtype=torch.float32)
        logps, support_logits, support_ids = TiledHeadLogProb.apply(
            hidden, head.weight, head.bias, targets, tile, top_k
        )
        return torch.cat([logps[:, None], support_logits, support_ids.float()], -1)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward
