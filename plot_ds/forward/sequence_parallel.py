"""Sequence parallelism on DeepSpeed's Ulysses (ALST): the ranks of a sequence group share each
pair, each holding a contiguous 1/N of every row's positions. Attention is the only place where
positions meet: DeepSpeed's ``UlyssesSPAttentionHF`` exchanges heads for positions (an all-to-all),
runs the model's own attention over the whole row for 1/N of the heads, and exchanges back. Every
other layer, the LM head (whole or tiled) and PLOT's supports work on the rank's own positions.

Exactness. A row's targets are read from its whole labels before it is cut, so the position that
ends one rank's slice predicts the token that starts the next one's. Per-pair log-probs are sums
over the group (an all-reduce whose backward sums the gradients again); the pair-level terms (DPO
and the other vanilla terms) count on the group's first rank only (``PairOutputs.pair_weight``),
their gradient reaching every rank's positions through that backward; position-level terms (PLOT)
count on every rank for its own positions; the global counts count each pair once
(``counted``). So the step's gradient does not depend on how ranks split into data and sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..pair_batch import IGNORE_INDEX, PairBatch, PairCounts, PairLogps, PairOutputs, ResponseTokens


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence group: ``size`` ranks sharing each pair, this one ``index``-th among
    them, ``group`` their process group."""

    size: int
    index: int
    group: object

    @property
    def first(self) -> bool:
        return self.index == 0

    def counted(self, counts: PairCounts) -> PairCounts:
        """What this rank adds to the global counts: the first rank of the group counts the pairs and
        tokens (every rank holds them), every rank counts its own micro-batch."""
        return counts if self.first else PairCounts(micro_batches=counts.micro_batches)

    def shard(self, batch: PairBatch, tokens: ResponseTokens) -> tuple[PairBatch, ResponseTokens]:
        """This rank's slice of every row, its global ``position_ids``, and the response positions in
        it (``tokens``, read from the whole rows, renumbered within the slice). Rows are padded to a
        multiple of the group's size; padding only follows a row's tokens, and attention is causal."""
        width = -(-batch.input_ids.shape[1] // self.size) * self.size
        pad = width - batch.input_ids.shape[1]
        piece = width // self.size
        start = self.index * piece
        keep = slice(start, start + piece)
        input_ids = F.pad(batch.input_ids, (0, pad))[:, keep]
        positions = torch.arange(start, start + piece).expand(input_ids.shape[0], piece)
        sharded = replace(
            batch,
            input_ids=input_ids,
            attention_mask=F.pad(batch.attention_mask, (0, pad))[:, keep],
            labels=F.pad(batch.labels, (0, pad), value=IGNORE_INDEX)[:, keep],
            position_ids=positions,
        )
        mine = (tokens.cols >= start) & (tokens.cols < start + piece)
        local = ResponseTokens(tokens.rows[mine], tokens.cols[mine] - start, tokens.targets[mine], tokens.n_rows)
        return sharded, local

    def pair_sums(self, outputs: PairOutputs) -> PairOutputs:
        """``outputs`` with each pair's log-probs and token counts summed over the group (the
        gradient of a sum reaches every rank's positions), and its pair-level weight."""
        import deepspeed.comm as dist

        logps = outputs.logps
        sums = GroupSum.apply(torch.cat([logps.chosen, logps.rejected]), self.group)
        counts = torch.cat([logps.chosen_tokens, logps.rejected_tokens])
        dist.all_reduce(counts, group=self.group)
        return replace(outputs, logps=PairLogps.from_rows(sums, counts), pair_weight=1.0 if self.first else 0.0)


class GroupSum(torch.autograd.Function):
    """The sum over a group's ranks of a tensor each holds; its gradient is the sum over the ranks of
    the sum's gradients (every rank's loss reads the sum: each rank's part feeds all of them)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        import deepspeed.comm as dist

        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import deepspeed.comm as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


# ------------------------------------------------------------------ the attention: DeepSpeed's Ulysses
_PAUSED = [False]


@contextmanager
def paused():
    """Attention over whole rows, as without sequence parallelism: for generation (a key/value cache
    and one new position at a time have no positions to exchange)."""
    _PAUSED[0] = True
    try:
        yield
    finally:
        _PAUSED[0] = False


def install_ulysses(model, group: SequenceGroup) -> None:
    """Route ``model``'s attention through DeepSpeed's ``UlyssesSPAttentionHF`` over ``group``.

    As DeepSpeed's ``register_with_transformers`` does, the model's attention implementation is
    replaced in transformers' registry, but by a wrapper that applies Ulysses only to the layers of
    models installed here (other models in the process attend as before) and not while ``paused``;
    it builds one ``UlyssesSPAttentionHF`` per row count (DeepSpeed's fixes the micro-batch's, which
    varies here) and needs no process groups of DeepSpeed's own making. It stays in place because a
    backward under gradient checkpointing runs the forward again. The model's mask is dropped, as
    DeepSpeed's wrapper does: attention over a whole row is causal (sdpa's ``is_causal``), and a
    row's padding only follows its tokens."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for module in model.modules():
        module.plot_ds_sequence_group = group
    name = model.config.get_text_config()._attn_implementation
    if not getattr(ALL_ATTENTION_FUNCTIONS[name], "plot_ds_ulysses", False):
        ALL_ATTENTION_FUNCTIONS[name] = ulysses_wrapper(ALL_ATTENTION_FUNCTIONS[name])


def ulysses_wrapper(core):
    """``core`` (an attention function of transformers' registry) under Ulysses for the layers of
    an installed model."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    built: dict[tuple[int, int], UlyssesSPAttentionHF] = {}

    def attention(layer, query, key, value, attention_mask, *args, **kwargs):
        group = getattr(layer, "plot_ds_sequence_group", None)
        if group is None or _PAUSED[0]:
            return core(layer, query, key, value, attention_mask, *args, **kwargs)
        key_of = (id(group), query.shape[0])
        if key_of not in built:
            built[key_of] = UlyssesSPAttentionHF(
                attn=core,
                batch_size=query.shape[0],
                attn_head_count=query.shape[1],
                attn_head_size=query.shape[3],
                kv_head_count=key.shape[1],
                num_hidden_layers=1,
                process_group=group.group,
                seq_length_is_variable=True,
            )
        # With fewer key/value heads than ranks, Ulysses replicates them and rewrites the layer's
        # num_key_value_groups for its call; a forward over whole rows (generation) needs it back.
        kv_groups = getattr(layer, "num_key_value_groups", None)
        try:
            return built[key_of](layer, query, key, value, None, *args, **kwargs)
        finally:
            if kv_groups is not None:
                layer.num_key_value_groups = kv_groups

    attention.plot_ds_ulysses = True
    return attention


def why_not_sequence_parallel(hf_config, size: int, max_length: int) -> str | None:
    """Why a model cannot split rows of up to ``max_length`` tokens over ``size`` ranks (Ulysses
    gives each rank whole heads, and attends causally over whole rows), or None."""
    config = hf_config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None:
        return "its config names no num_attention_heads"
    if heads % size:
        return f"its {heads} attention heads do not divide into {size} ranks"
    if kv_heads % size and size % kv_heads:
        return f"its {kv_heads} key/value heads neither divide into {size} ranks nor {size} into them"
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    slides = any("sliding" in str(kind) for kind in layer_types) or (
        not layer_types and getattr(config, "use_sliding_window", True)
    )
    if window and slides and max_length > window:
        return (
            f"it attends within a sliding window of {window} tokens, shorter than data.max_length "
            f"{max_length}, and Ulysses attends causally over whole rows"
        )
    if getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps its attention logits, which attention over whole rows under Ulysses would not"
    return None
