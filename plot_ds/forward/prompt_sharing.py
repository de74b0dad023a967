"""Each pair's prompt computed once: a prompt pass keeps its key/value cache, the chosen and
rejected responses continue from copies of it in two passes of similar lengths, and the LM head runs
once on the hidden states of all passes. Same logits and gradients as full rows (tested).

Switched on per engine when it is built (``prompt_sharing``, from ``model.share_prompt``), and
handed to ``pair_forward.forward_pairs`` explicitly.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass

import torch

from .logprobs import to_device, with_head_input

from ..pair_batch import ResponseTokens
from ..pair_batch import IGNORE_INDEX, PairBatch


@dataclass(frozen=True)
class PromptSharing:
    """Prompt sharing is on for a model whose forward takes its key/value cache as ``cache_argument``."""

    cache_argument: str


def cache_argument(module) -> str | None:
    """The forward's key/value-cache keyword: ``cache`` from transformers 5.2x on, ``past_key_values``
    before (the output field has the same name)."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def prompt_sharing(model, enabled: bool) -> PromptSharing | None:
    """The setting for a model (or DeepSpeed engine): None when off or when the model cannot share
    (a decoder whose forward takes a key/value cache is needed; a warning says so)."""
    module = getattr(model, "module", model)
    argument = cache_argument(module)
    sharing = enabled and argument is not None and not module.config.is_encoder_decoder
    if enabled and not sharing:
        warnings.warn(
            f"model.share_prompt: {type(module).__name__} takes no key/value cache in its forward "
            f"(or is an encoder-decoder); chosen and rejected rows each compute their prompt"
        )
    return PromptSharing(argument) if sharing else None


def copyable(cache) -> bool:
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


def cache_rows(cache, rows: torch.Tensor, copied: bool):
    """The prompt cache with batch rows ``rows`` (repeats allowed): a copy that leaves ``cache`` as it
    was (``copied``, see ``copyable``), else ``cache`` itself, changed."""
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


@dataclass
class SharedLayout:
    """Where each row's prompt and response lie in a collated batch of prompt-sharing pairs (chosen
    row i and rejected row n + i with the same prompt); all on the host."""

    ids: torch.Tensor
    starts: torch.Tensor  # [rows] prompt length of each row
    lengths: torch.Tensor  # [rows] response length of each row
    pad: int

    @property
    def pairs(self) -> int:
        return self.ids.shape[0] // 2

    @classmethod
    def of(cls, batch: PairBatch) -> "SharedLayout | None":
        """None when the rows are not prompt-sharing pairs."""
        ids, labels = batch.input_ids, batch.labels
        rows, pairs = ids.shape[0], ids.shape[0] // 2
        is_response = labels != IGNORE_INDEX
        starts, lengths = is_response.int().argmax(1), is_response.sum(1)
        if rows % 2 or not bool(lengths.gt(0).all()) or not torch.equal(starts[:pairs], starts[pairs:]):
            return None
        if not all(torch.equal(ids[i, :p], ids[pairs + i, :p]) for i, p in enumerate(starts[:pairs].tolist())):
            return None
        return cls(ids, starts, lengths, int(ids[0, -1]) if ids.shape[1] else 0)  # any pad id: masked out

    def prompt_pass(self) -> dict:
        """The prompts, left-padded so that all end in the last column (whose position predicts each
        row's first response token)."""
        prompt_lengths = self.starts[: self.pairs]
        width = int(prompt_lengths.max())
        prompt_ids = torch.full((self.pairs, width), self.pad, dtype=self.ids.dtype)
        prompt_mask = torch.zeros(self.pairs, width, dtype=torch.long)
        for i, p in enumerate(prompt_lengths.tolist()):
            prompt_ids[i, width - p :], prompt_mask[i, width - p :] = self.ids[i, :p], 1
        return dict(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=(prompt_mask.cumsum(1) - 1).clamp_min(0)
        )

    def response_passes(
        self, groups: list[torch.Tensor], prompt_mask: torch.Tensor, tokens: ResponseTokens
    ) -> tuple[list[dict], torch.Tensor]:
        """One pass per group of rows over the prompt cache, and for each of the N response tokens
        (``tokens``, in their order) the index of its predicting state among the hidden states kept
        in pass order: the prompt pass's last states first, then each pass's predicting positions."""
        rows, pairs = self.ids.shape[0], self.pairs
        # slot[r, j]: the state that predicts response token j + 1 of row r; token 0 is predicted by
        # the prompt's last position, index r % pairs.
        slot = torch.full((rows, int(self.lengths.max())), -1, dtype=torch.long)
        passes, filled = [], pairs
        for group in groups:
            group_lengths = self.lengths[group]
            span = int(group_lengths.max())
            response_ids = torch.full((len(group), span), self.pad, dtype=self.ids.dtype)
            response_mask = torch.zeros(len(group), span, dtype=torch.long)
            for k, (r, n) in enumerate(zip(group.tolist(), group_lengths.tolist())):
                p = int(self.starts[r])
                response_ids[k, :n], response_mask[k, :n] = self.ids[r, p : p + n], 1
            predicting = response_mask.clone()
            predicting[torch.arange(len(group)), group_lengths - 1] = 0
            head_rows, head_cols = predicting.nonzero(as_tuple=True)
            slot[group[head_rows], head_cols] = filled + torch.arange(head_rows.numel())
            filled += head_rows.numel()
            passes.append(
                dict(
                    input_ids=response_ids,
                    position_ids=self.starts[group, None] + torch.arange(span),
                    attention_mask=torch.cat([prompt_mask[group % pairs], response_mask], 1),
                    head_rows=head_rows,
                    head_cols=head_cols,
                    prompt_rows=group % pairs,
                )
            )
        step = tokens.cols - (self.starts[tokens.rows] - 1)
        source = torch.where(step == 0, tokens.rows % pairs, slot[tokens.rows, (step - 1).clamp_min(0)])
        return passes, source


def shared_prompt_logits(
    model, batch: PairBatch, tokens: ResponseTokens, device, sharing: PromptSharing
) -> torch.Tensor | None:
    """[N, V] logits at the response positions, computing each pair's prompt once.

    Pass 1 runs the prompts and keeps their key/value cache. The responses then run on top of it in
    two passes of rows of similar lengths (``response_groups``), each over its own copy of the prompt
    rows it needs, padded only to its own longest response. (Where a copy could change the cache,
    see ``copyable``, one pass runs all responses.) The passes are the model's own forward (ZeRO-3
    hooks and all); the LM head runs once, in the last pass, on the hidden states of all passes, and
    only at the positions that predict a response token. ``tokens``: the CPU positions. None when the
    rows are not prompt-sharing pairs.
    """
    layout = SharedLayout.of(batch)
    if layout is None:
        return None
    to = lambda t: to_device(t, device)  # noqa: E731
    hidden = []  # hidden states that predict response tokens, in the order of the passes

    def keep_prompt_last(states):
        hidden.append(states[:, -1])
        return states[:0, -1]

    prompt = layout.prompt_pass()
    first = with_head_input(model, keep_prompt_last, use_cache=True, **{k: to(v) for k, v in prompt.items()})
    cache = getattr(first, sharing.cache_argument)
    can_copy = copyable(cache)
    groups = response_groups(layout.lengths) if can_copy else [torch.arange(layout.ids.shape[0])]
    passes, source = layout.response_passes(groups, prompt["attention_mask"], tokens)
    source = to(source)
    for index, inputs in enumerate(passes):
        inputs = {name: to(value) for name, value in inputs.items()}
        head_rows, head_cols = inputs.pop("head_rows"), inputs.pop("head_cols")
        last = index == len(passes) - 1
        # The last pass may take the cache itself: nothing reads it after.
        pass_cache = cache_rows(cache, inputs.pop("prompt_rows"), copied=can_copy and not last)

        def head_input(states, head_rows=head_rows, head_cols=head_cols, last=last):
            hidden.append(states[head_rows, head_cols])
            # Reordering [N, d] hidden states, not [N, V] logits: no logits-sized copies.
            return torch.cat(hidden).index_select(0, source) if last else states[:0, 0]

        out = with_head_input(model, head_input, use_cache=True, **{sharing.cache_argument: pass_cache}, **inputs)
    return out.logits
