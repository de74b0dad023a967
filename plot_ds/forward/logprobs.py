"""Response log-probabilities from the head's [N, V] logits at the N response positions.

Log-probs of the targets come from ``TargetLogProb``, float32 a chunk of positions at a time, which
keeps only the [N, V] logits for its backward (no float32 copy, no saved softmax), and reads PLOT's
top-k supports in the same pass. How a model's forward produces those logits (the LM head only on
response positions, prompt sharing) is ``pair_forward``'s concern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pair_batch import PairLogps, PairOutputs, ResponseTokens, SupportLogits


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor onto ``device`` without making the host wait: a copy from pageable memory
    synchronises the stream first, one from pinned memory is only queued."""
    device = torch.device(device)
    if tensor.device == device or device.type == "cpu":
        return tensor.to(device)
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().pin_memory(tensor).to(device, non_blocking=True)


@dataclass
class RowOutputs:
    """Per row of a head's logits: float32 log-sum-exp and target logit, and, with a top-k, the
    support (top-k ids, then the target) and its float32 logits; filled a tile of rows at a time."""

    logsumexp: torch.Tensor  # [N]
    picked: torch.Tensor  # [N]
    support_ids: torch.Tensor  # [N, k + 1]; [N, 0] without a support
    support_logits: torch.Tensor  # [N, k + 1]

    @classmethod
    def empty(cls, n: int, targets: torch.Tensor, top_k: int) -> "RowOutputs":
        support_ids = targets.new_empty(n, top_k + 1 if top_k else 0)
        floats = lambda *shape: torch.empty(shape, device=targets.device, dtype=torch.float32)  # noqa: E731
        return cls(floats(n), floats(n), support_ids, floats(*support_ids.shape))

    def read(self, logits: torch.Tensor, targets: torch.Tensor, rows: slice) -> None:
        """``rows``' outputs from their float32 ``logits`` and ``targets``."""
        self.logsumexp[rows] = logits.logsumexp(-1)
        self.picked[rows] = logits.gather(-1, targets[:, None]).squeeze(-1)
        if self.support_ids.shape[1]:
            top = logits.topk(self.support_ids.shape[1] - 1, dim=-1).indices
            self.support_ids[rows] = torch.cat([top, targets[:, None]], -1)
            self.support_logits[rows] = logits.gather(-1, self.support_ids[rows])

    @property
    def logps(self) -> torch.Tensor:
        return self.picked - self.logsumexp


def tile_gradient(logits, targets, logsumexp, support_ids, grad_logps, grad_support) -> torch.Tensor:
    """The gradient of a tile's float32 logits (overwritten with it) from the gradients of its rows'
    log-probs and support logits."""
    if grad_logps is None:
        logits.zero_()
    else:
        # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z)
        scale = grad_logps[:, None].float()
        logits.sub_(logsumexp[:, None]).exp_().mul_(-scale)
        logits.scatter_add_(-1, targets[:, None], scale)
    if grad_support is not None:
        logits.scatter_add_(-1, support_ids, grad_support.float())
    return logits


class TargetLogProb(torch.autograd.Function):
    """log softmax(logits)[target] per row of [N, V] logits, float32, in chunks of rows; with
    ``top_k`` > 0 also each row's ``SupportLogits``, read from the same float32 chunk.

    Saves the logits (in their own dtype) and one float per row; the backward recomputes each
    chunk's softmax, so no [N, V] float32 tensor outlives a chunk. The support logits' gradient is
    added into the same chunk (a separate gather would have autograd zero-fill an [N, V] gradient and
    add it to this one). With ``in_place_grad`` the backward writes the gradient over the saved
    logits instead of allocating a second [N, V] tensor (the step's peak is the head's backward):
    for logits nothing reads after the backward."""

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int, in_place_grad: bool = False, top_k: int = 0
    ):
        out = RowOutputs.empty(logits.shape[0], targets, top_k)
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            out.read(logits[rows].float(), targets[rows], rows)
        ctx.save_for_backward(logits, targets, out.logsumexp, out.support_ids)
        ctx.chunk, ctx.in_place_grad = chunk, in_place_grad
        ctx.mark_non_differentiable(out.support_ids)
        ctx.set_materialize_grads(False)
        return out.logps, out.support_logits, out.support_ids

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor | None, grad_support: torch.Tensor | None, _):
        logits, targets, logsumexp, support_ids = ctx.saved_tensors
        # Each chunk is read (into a float32 temporary) before its rows are overwritten.
        grad = logits if ctx.in_place_grad else torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            # A float32 tile to overwrite: a copy, unless the gradient takes the logits' place anyway.
            part = logits[rows].float()
            if part.data_ptr() == logits[rows].data_ptr() and grad is not logits:
                part = part.clone()
            grad[rows] = tile_gradient(
                part,
                targets[rows],
                logsumexp[rows],
                support_ids[rows],
                None if grad_logps is None else grad_logps[rows],
                None if grad_support is None else grad_support[rows],
            )
        return grad, None, None, None, None


def move_tokens(tokens: ResponseTokens, device) -> ResponseTokens:
    """``tokens`` on ``device``, copied without making the host wait (``to_device``)."""
    return ResponseTokens(
        to_device(tokens.rows, device), to_device(tokens.cols, device), to_device(tokens.targets, device), tokens.n_rows
    )


def saved_by_its_own_node(tensor: torch.Tensor) -> bool:
    """Whether the autograd node that made ``tensor`` saved it for its backward (tanh, exp, ...
    keep their result): then it must not be overwritten before that backward runs."""
    node = tensor.grad_fn
    if node is None:
        return False
    for name in dir(node):
        if name.startswith("_saved_"):
            value = getattr(node, name)
            if isinstance(value, torch.Tensor) and value.data_ptr() == tensor.data_ptr():
                return True
    return False


def target_logps(
    logits: torch.Tensor, targets: torch.Tensor, chunk: int = 256, in_place_grad: bool = False
) -> torch.Tensor:
    return TargetLogProb.apply(logits, targets, chunk, in_place_grad)[0]


def target_logps_and_support(
    logits: torch.Tensor, targets: torch.Tensor, top_k: int, chunk: int = 256, in_place_grad: bool = False
) -> tuple[torch.Tensor, SupportLogits]:
    """``target_logps`` and the rows' top-``top_k`` ``SupportLogits`` in one pass over the logits."""
    logps, support_logits, support_ids = TargetLogProb.apply(logits, targets, chunk, in_place_grad, top_k)
    return logps, SupportLogits(support_ids, support_logits)


def pair_outputs(logits: torch.Tensor, tokens: ResponseTokens, keep_logits: bool, top_k: int = 0) -> PairOutputs:
    """The loss path's start: per-pair log-probs (and, for PLOT, the logits or the top-k supports)
    of the head's [N, V] logits."""
    # The head's output is read by nothing after the backward (PLOT reads it, or copies of it, in the
    # forward only), so its gradient may take its place, unless the op that made it needs it back
    # (a softcap's tanh).
    in_place = not saved_by_its_own_node(logits)
    logps, support = target_logps_and_support(logits, tokens.targets, top_k, in_place_grad=in_place)
    logps = PairLogps.from_rows(tokens.row_sums(logps), tokens.row_counts())
    return PairOutputs(logps, logits if keep_logits else None, tokens, support if top_k else None)


def with_head_input(model, select, **inputs):
    """The model's own forward (ZeRO-3's hooks and all), with a pre-hook on the output embedding
    that hands the LM head ``select(hidden states)`` instead of every position's state."""
    module = getattr(model, "module", model)
    hook = module.get_output_embeddings().register_forward_pre_hook(lambda _, args: (select(args[0]), *args[1:]))
    try:
        return model(**inputs)
    finally:
        hook.remove()
