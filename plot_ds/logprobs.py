"""Response log-probabilities from one forward over chosen and rejected rows, without the full
[batch, length, vocab] logits.

The LM head runs only on the positions that predict a response token (a pre-hook hands it those
hidden states): prompt and padding positions never reach the vocabulary projection. Log-probs of
the targets come from ``TargetLogProb``, float32 a chunk of positions at a time, which keeps only
the [N, V] logits for its backward (no float32 copy, no saved softmax).
"""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor onto ``device`` without making the host wait: a copy from pageable memory
    synchronises the stream first, one from pinned memory is only queued."""
    device = torch.device(device)
    if tensor.device == device or device.type == "cpu":
        return tensor.to(device)
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().pin_memory(tensor).to(device, non_blocking=True)


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
        return ResponseTokens(to_device(self.rows, device), to_device(self.cols, device),
                              to_device(self.targets, device), self.n_rows)

    def select(self, per_position: torch.Tensor) -> torch.Tensor:
        """[rows, length, ...] -> [N, ...]: the entries at the response positions."""
        return per_position[self.rows, self.cols]

    def row_sums(self, values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(self.n_rows).index_add(0, self.rows, values)

    def row_counts(self) -> torch.Tensor:
        return torch.zeros(self.n_rows, dtype=torch.long, device=self.rows.device).index_add(
            0, self.rows, torch.ones_like(self.rows))


@dataclass
class SupportLogits:
    """Per response position: the ids of its ``k`` most likely tokens, then its target token, and
    their logits (float32, carrying gradient to the head): all PLOT reads of a top-k support."""
    ids: torch.Tensor     # [N, k + 1]
    logits: torch.Tensor  # [N, k + 1] float32


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
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int, in_place_grad: bool = False,
                top_k: int = 0):
        n = logits.shape[0]
        logsumexp = torch.empty(n, device=logits.device, dtype=torch.float32)
        picked = torch.empty(n, device=logits.device, dtype=torch.float32)
        support_ids = targets.new_empty(n, top_k + 1 if top_k else 0)
        support_logits = torch.empty(support_ids.shape, device=logits.device, dtype=torch.float32)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            part = logits[rows].float()
            logsumexp[rows] = part.logsumexp(-1)
            picked[rows] = part.gather(-1, targets[rows, None]).squeeze(-1)
            if top_k:
                support_ids[rows] = torch.cat([part.topk(top_k, dim=-1).indices, targets[rows, None]], -1)
                support_logits[rows] = part.gather(-1, support_ids[rows])
        ctx.save_for_backward(logits, targets, logsumexp, support_ids)
        ctx.chunk, ctx.in_place_grad = chunk, in_place_grad
        ctx.mark_non_differentiable(support_ids)
        ctx.set_materialize_grads(False)
        return picked - logsumexp, support_logits, support_ids

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor | None, grad_support: torch.Tensor | None, _):
        logits, targets, logsumexp, support_ids = ctx.saved_tensors
        # Each chunk is read (into a float32 temporary) before its rows are overwritten.
        grad = logits if ctx.in_place_grad else torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            if grad_logps is None:
                part = torch.zeros(logits[rows].shape, device=logits.device, dtype=torch.float32)
            else:
                # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z)
                scale = grad_logps[rows, None].float()
                part = (logits[rows].float() - logsumexp[rows, None]).exp_().mul_(-scale)
                part.scatter_add_(-1, targets[rows, None], scale)
            if grad_support is not None:
                part.scatter_add_(-1, support_ids[rows], grad_support[rows].float())
            grad[rows] = part
        return grad, None, None, None, None


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


def target_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 256,
                 in_place_grad: bool = False) -> torch.Tensor:
    return TargetLogProb.apply(logits, targets, chunk, in_place_grad)[0]


def target_logps_and_support(logits: torch.Tensor, targets: torch.Tensor, top_k: int, chunk: int = 256,
                             in_place_grad: bool = False) -> tuple[torch.Tensor, SupportLogits]:
    """``target_logps`` and the rows' top-``top_k`` ``SupportLogits`` in one pass over the logits."""
    logps, support_logits, support_ids = TargetLogProb.apply(logits, targets, chunk, in_place_grad, top_k)
    return logps, SupportLogits(support_ids, support_logits)


def top_k_support(logits: torch.Tensor, targets: torch.Tensor, top_k: int, chunk: int = 512) -> SupportLogits:
    """The ``SupportLogits`` of [N, V] logits read on their own (autograd gathers the gradient);
    ``target_logps_and_support`` reads them in its log-prob pass instead. The top-k runs on bounded
    chunks without autograd."""
    with torch.no_grad():
        top = torch.cat([logits[i:i + chunk].topk(top_k, dim=-1).indices
                         for i in range(0, logits.shape[0], chunk)]) if logits.shape[0] else targets.new_zeros(0, top_k)
    ids = torch.cat([top, targets.unsqueeze(-1)], dim=-1)
    return SupportLogits(ids, logits.gather(-1, ids).float())


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
    """A model's outputs on a collated batch: log-probs, and where a loss needs them the [N, V]
    logits at the response positions or each position's top-k ``SupportLogits``."""
    logps: PairLogps
    logits: torch.Tensor | None
    tokens: ResponseTokens
    support: SupportLogits | None = None


def response_logits(model, input_ids, attention_mask, tokens: ResponseTokens) -> torch.Tensor:
    """[N, V] logits at the response positions. The model's own forward runs (ZeRO-3's hooks and
    all); a pre-hook on the output embedding hands the LM head only the N hidden states."""
    return _with_head_input(model, tokens.select, input_ids=input_ids, attention_mask=attention_mask,
                            use_cache=False).logits


SHARE_PROMPT = "plot_ds_share_prompt"


def _cache_argument(module) -> str | None:
    """The forward's key/value-cache keyword: ``cache`` from transformers 5.2x on, ``past_key_values``
    before (the output field has the same name)."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def enable_prompt_sharing(model, enabled: bool) -> None:
    """Mark a model (or DeepSpeed engine) for ``shared_prompt_logits``. Needs a decoder whose
    forward takes a key/value cache; gradient checkpointing drops the cache, so it must be off."""
    module = getattr(model, "module", model)
    argument = _cache_argument(module)
    sharing = enabled and argument is not None and not module.config.is_encoder_decoder
    if enabled and not sharing:
        warnings.warn(f"model.share_prompt: {type(module).__name__} takes no key/value cache in its forward "
                      f"(or is an encoder-decoder); chosen and rejected rows each compute their prompt")
    setattr(model, SHARE_PROMPT, argument if sharing else None)


def _with_head_input(model, select, **inputs):
    module = getattr(model, "module", model)
    hook = module.get_output_embeddings().register_forward_pre_hook(lambda _, args: (select(args[0]), *args[1:]))
    try:
        return model(**inputs)
    finally:
        hook.remove()


def _copyable(cache) -> bool:
    """Whether a copy of ``cache`` with rows selected leaves the cache itself as it was: layers that
    rebind, never write into, their tensors when rows are selected or states appended (full,
    sliding-window and indexed attention; a recurrent state may be updated in place)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    kinds = {DynamicLayer, DynamicSlidingWindowLayer}
    try:
        from transformers.cache_utils import DynamicIndexedLayer
        kinds.add(DynamicIndexedLayer)
    except ImportError:
        pass
    return all(type(layer) in kinds for layer in getattr(cache, "layers", [None]))


def _cache_rows(cache, rows: torch.Tensor, copied: bool):
    """The prompt cache with batch rows ``rows`` (repeats allowed): a copy that leaves ``cache`` as it
    was (``copied``, see ``_copyable``), else ``cache`` itself, changed."""
    if copied:
        cache = copy.copy(cache)
        cache.layers = [copy.copy(layer) for layer in cache.layers]
    cache.batch_select_indices(rows)
    return cache


def response_groups(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Response rows in two passes, each padded to its own longest, where the padded tokens are
    fewest: the rows sorted by length, split where the sum of group size x longest is smallest (the
    best two-way split is always one of a sorted order; chosen-vs-rejected is one of the two-way
    splits, so never better). Always two passes, even where one would pad no more: under ZeRO-3
    each pass gathers the parameters with collectives, so every rank must run as many passes."""
    order = lengths.argsort(stable=True)
    ordered = lengths[order].tolist()
    rows = len(ordered)
    if rows < 2:
        return [order]
    split = min(range(1, rows), key=lambda k: (k * ordered[k - 1] + (rows - k) * ordered[-1], abs(2 * k - rows)))
    return [order[:split], order[split:]]


def shared_prompt_logits(model, batch: dict, tokens: ResponseTokens, device) -> torch.Tensor | None:
    """[N, V] logits at the response positions, computing each pair's prompt once.

    Pass 1 runs the prompts (left-padded so that all end in the last column) and keeps their
    key/value cache; its last position predicts the first response token. The responses then run
    on top of that cache in two passes of rows of similar lengths (``response_groups``),
    each over its own copy of the prompt rows it needs, padded only to its own longest response.
    (Where a copy could change the cache, see ``_copyable``, one pass runs all responses.) The
    passes are the model's own forward (ZeRO-3 hooks and all); the LM head runs once, in the last
    pass, on the hidden states of all passes, and only at the positions that predict a response
    token. ``tokens``: the CPU positions. None when the rows are not prompt-sharing pairs (chosen
    row i and rejected row n + i with the same prompt).
    """
    ids, labels = batch["input_ids"], batch["labels"]
    rows, pairs = ids.shape[0], ids.shape[0] // 2
    is_response = labels != IGNORE_INDEX
    starts = is_response.int().argmax(1)             # prompt length of each row
    lengths = is_response.sum(1)
    if rows % 2 or not bool(lengths.gt(0).all()) or not torch.equal(starts[:pairs], starts[pairs:]):
        return None
    prompt_lengths = starts[:pairs]
    if not all(torch.equal(ids[i, :p], ids[pairs + i, :p]) for i, p in enumerate(prompt_lengths.tolist())):
        return None
    pad = int(ids[0, -1]) if ids.shape[1] else 0  # any id: padded positions are masked out
    width = int(prompt_lengths.max())
    prompt_ids = torch.full((pairs, width), pad, dtype=ids.dtype)
    prompt_mask = torch.zeros(pairs, width, dtype=torch.long)
    for i, p in enumerate(prompt_lengths.tolist()):
        prompt_ids[i, width - p:], prompt_mask[i, width - p:] = ids[i, :p], 1
    prompt_positions = (prompt_mask.cumsum(1) - 1).clamp_min(0)

    to = lambda t: to_device(t, device)  # noqa: E731
    hidden = []  # hidden states that predict response tokens, in the order of the passes

    def keep_prompt_last(states):
        hidden.append(states[:, -1])
        return states[:0, -1]

    argument = getattr(model, SHARE_PROMPT)
    first = _with_head_input(model, keep_prompt_last, input_ids=to(prompt_ids),
                             attention_mask=to(prompt_mask), position_ids=to(prompt_positions), use_cache=True)
    cache = getattr(first, argument)
    copyable = _copyable(cache)
    groups = response_groups(lengths) if copyable else [torch.arange(rows)]

    # slot[r, j]: index in ``hidden`` (concatenated) of the state that predicts response token
    # j + 1 of row r; token 0 is predicted by the prompt's last position, hidden index r % pairs.
    slot = torch.full((rows, int(lengths.max())), -1, dtype=torch.long)
    passes, filled = [], pairs
    for group in groups:
        group_lengths = lengths[group]
        span = int(group_lengths.max())
        response_ids = torch.full((len(group), span), pad, dtype=ids.dtype)
        response_mask = torch.zeros(len(group), span, dtype=torch.long)
        for k, (r, n) in enumerate(zip(group.tolist(), group_lengths.tolist())):
            p = int(starts[r])
            response_ids[k, :n], response_mask[k, :n] = ids[r, p:p + n], 1
        predicting = response_mask.clone()
        predicting[torch.arange(len(group)), group_lengths - 1] = 0
        head_rows, head_cols = predicting.nonzero(as_tuple=True)
        slot[group[head_rows], head_cols] = filled + torch.arange(head_rows.numel())
        filled += head_rows.numel()
        passes.append(dict(input_ids=to(response_ids), position_ids=to(starts[group, None] + torch.arange(span)),
                           attention_mask=to(torch.cat([prompt_mask[group % pairs], response_mask], 1)),
                           head_rows=to(head_rows), head_cols=to(head_cols), prompt_rows=to(group % pairs)))
    step = tokens.cols - (starts[tokens.rows] - 1)
    source = to(torch.where(step == 0, tokens.rows % pairs, slot[tokens.rows, (step - 1).clamp_min(0)]))

    for index, inputs in enumerate(passes):
        head_rows, head_cols = inputs.pop("head_rows"), inputs.pop("head_cols")
        last = index == len(passes) - 1
        # The last pass may take the cache itself: nothing reads it after.
        pass_cache = _cache_rows(cache, inputs.pop("prompt_rows"), copied=copyable and not last)

        def head_input(states, head_rows=head_rows, head_cols=head_cols, last=last):
            hidden.append(states[head_rows, head_cols])
            # Reordering [N, d] hidden states, not [N, V] logits: no logits-sized copies.
            return torch.cat(hidden).index_select(0, source) if last else states[:0, 0]

        out = _with_head_input(model, head_input, use_cache=True, **{argument: pass_cache}, **inputs)
    return out.logits


def forward_pairs(model, batch: dict, keep_logits: bool, top_k: int = 0) -> PairOutputs:
    """One forward over the chosen and rejected rows of a collated batch together (two passes
    sharing the prompts when the model allows it, see ``shared_prompt_logits``). ``keep_logits``
    keeps the [N, V] logits; ``top_k`` > 0 reads each position's top-k ``SupportLogits`` in the
    log-prob pass."""
    return pair_outputs(*head_logits(model, batch), keep_logits, top_k)


def head_logits(model, batch: dict) -> tuple[torch.Tensor, ResponseTokens]:
    """The [N, V] logits at the response positions of a collated batch, and those positions."""
    device = model.device
    cpu_tokens = ResponseTokens.of(batch["labels"])
    logits = None
    if getattr(model, SHARE_PROMPT, None):
        logits = shared_prompt_logits(model, batch, cpu_tokens, device)
    tokens = cpu_tokens.to(device)
    if logits is None:
        logits = response_logits(model, to_device(batch["input_ids"], device),
                                 to_device(batch["attention_mask"], device), tokens)
    return logits, tokens


def pair_outputs(logits: torch.Tensor, tokens: ResponseTokens, keep_logits: bool, top_k: int = 0) -> PairOutputs:
    """The loss path's start: per-pair log-probs (and ``forward_pairs``'s other outputs) of the head's
    [N, V] logits."""
    # The head's output is read by nothing after the backward (PLOT reads it, or copies of it, in the
    # forward only), so its gradient may take its place, unless the op that made it needs it back
    # (a softcap's tanh).
    in_place = not saved_by_its_own_node(logits)
    logps, support = target_logps_and_support(logits, tokens.targets, top_k, in_place_grad=in_place)
    logps = PairLogps.from_rows(tokens.row_sums(logps), tokens.row_counts())
    return PairOutputs(logps, logits if keep_logits else None, tokens, support if top_k else None)


def reference_pairs(engine, batch: dict, keep_logits: bool, device) -> PairOutputs | None:
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
        return forward_pairs(engine, batch, keep_logits)
