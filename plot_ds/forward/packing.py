"""Padding-free micro-batches (``data.packing``): the rows of a collated batch concatenated into one
row, each sequence with its own ``position_ids``, so that no padded position is computed.

Two layouts, both one forward pass:

- every row its own sequence (prompt + chosen, prompt + rejected). Attention stays inside each
  sequence: transformers reads the sequence boundaries from the restarting ``position_ids`` (a
  block-diagonal mask for sdpa/eager/flex; varlen kernels for flash attention, to which the
  ``cu_seqlens`` are also handed, so that no layer has to find them again).
- ``share_prompt``: each pair laid out prompt, chosen, rejected; the rejected response continues
  the prompt's positions and attends to the prompt and to itself, never to the chosen response (a
  4D mask, sdpa/eager only). The prompt is computed once, in the same pass.

The response positions (``pair_batch.ResponseTokens``) stay those of the padded batch, in its order:
every log-prob, PLOT support and per-pair or per-token reduction reads the same tokens; only where
their predicting hidden states lie (``PackedRows.head_positions``) changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .logprobs import to_device, with_head_input

from ..pair_batch import ResponseTokens
from ..pair_batch import PairBatch

# Attention implementations that take a custom 4D additive mask (the shared-prompt layout).
MASKED_ATTENTION = ("eager", "sdpa")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass(frozen=True)
class Packing:
    """``data.packing`` for one engine: ``share_prompt`` picks the shared-prompt layout; ``varlen``
    hands flash attention its cumulative sequence lengths."""

    share_prompt: bool
    varlen: bool


@dataclass
class PackedRows:
    """A batch's rows as one packed row, all on the host."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    head_positions: torch.Tensor  # [N]: the packed position predicting each response token
    sequence_lengths: torch.Tensor  # tokens of each packed sequence (a pair's, when sharing)
    pair_of: torch.Tensor | None = None  # [T] pair of each token (shared-prompt layout)
    part: torch.Tensor | None = None  # [T] PROMPT, CHOSEN or REJECTED (shared-prompt layout)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def attention_mask(self, dtype: torch.dtype, device="cpu") -> torch.Tensor:
        """The shared-prompt layout's [1, 1, T, T] additive mask: causal within a pair, the chosen
        response hidden from the rejected one. Built on ``device`` from the [T] layout (a T x T
        mask is not copied from the host)."""
        pair_of, part = to_device(self.pair_of, device), to_device(self.part, device)
        causal = torch.ones(self.length, self.length, dtype=torch.bool, device=pair_of.device).tril_()
        allowed = causal & (pair_of[:, None] == pair_of[None, :])
        allowed &= ~((part == REJECTED)[:, None] & (part == CHOSEN)[None, :])
        mask = torch.zeros(self.length, self.length, dtype=dtype, device=pair_of.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]

    def varlen_kwargs(self) -> dict:
        bounds = torch.zeros(len(self.sequence_lengths) + 1, dtype=torch.int32)
        bounds[1:] = self.sequence_lengths.cumsum(0)
        longest = int(self.sequence_lengths.max())
        return dict(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)


def row_lengths(batch: PairBatch) -> torch.Tensor:
    return batch.attention_mask.sum(1)


def pack_rows(batch: PairBatch, tokens: ResponseTokens) -> PackedRows:
    """Every row its own sequence, in row order. ``tokens``: the batch's (host) response positions."""
    lengths = row_lengths(batch)
    ids = batch.input_ids
    input_ids = torch.cat([ids[r, :n] for r, n in enumerate(lengths.tolist())])
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])
    offsets = lengths.cumsum(0) - lengths
    return PackedRows(input_ids[None], position_ids[None], offsets[tokens.rows] + tokens.cols, lengths)


def pack_shared_prompt(
    batch: PairBatch, tokens: ResponseTokens, prompt_lengths: torch.Tensor, response_lengths: torch.Tensor
) -> PackedRows:
    """Pair i as prompt, chosen, rejected (rows i and n + i of a prompt-sharing batch, see
    ``prompt_sharing.SharedLayout``): the rejected response's positions continue the prompt's."""
    ids = batch.input_ids
    pairs = ids.shape[0] // 2
    pieces, positions, pair_of, part = [], [], [], []
    for i in range(pairs):
        p, c, r = int(prompt_lengths[i]), int(response_lengths[i]), int(response_lengths[pairs + i])
        pieces += [ids[i, : p + c], ids[pairs + i, p : p + r]]
        positions += [torch.arange(p + c), p + torch.arange(r)]
        pair_of.append(torch.full((p + c + r,), i))
        part.append(torch.tensor([PROMPT, CHOSEN, REJECTED]).repeat_interleave(torch.tensor([p, c, r])))
    sizes = prompt_lengths[:pairs] + response_lengths[:pairs] + response_lengths[pairs:]
    offsets = sizes.cumsum(0) - sizes
    pair = tokens.rows % pairs
    chosen_length = response_lengths[pair]
    # A rejected token's predicting state: the prompt's last (shared) for its first token, else past
    # the chosen response.
    shift = torch.where((tokens.rows >= pairs) & (tokens.cols >= prompt_lengths[pair]), chosen_length, 0)
    return PackedRows(
        torch.cat(pieces)[None],
        torch.cat(positions)[None],
        offsets[pair] + tokens.cols + shift,
        sizes,
        torch.cat(pair_of),
        torch.cat(part),
    )


def packed_inputs(
    batch: PairBatch, tokens: ResponseTokens, packing: Packing, dtype: torch.dtype, device="cpu"
) -> tuple[dict, PackedRows]:
    """The model's keyword inputs for a packed batch, on ``device``, and its (host) layout."""
    from .prompt_sharing import SharedLayout

    layout = SharedLayout.of(batch) if packing.share_prompt else None
    if layout is not None:
        packed = pack_shared_prompt(batch, tokens, layout.starts, layout.lengths)
        inputs = dict(attention_mask=packed.attention_mask(dtype, device))
    else:
        packed = pack_rows(batch, tokens)
        inputs = (
            {
                name: to_device(value, device) if isinstance(value, torch.Tensor) else value
                for name, value in packed.varlen_kwargs().items()
            }
            if packing.varlen
            else {}
        )
    return dict(
        input_ids=to_device(packed.input_ids, device), position_ids=to_device(packed.position_ids, device), **inputs
    ), packed


def packed_logits(model, batch: PairBatch, tokens: ResponseTokens, device, packing: Packing) -> torch.Tensor:
    """[N, V] logits at the response positions of ``batch`` (``tokens``, on the host, in their
    order), from one forward over its packed rows."""
    module = getattr(model, "module", model)
    inputs, packed = packed_inputs(batch, tokens, packing, module.dtype, device)
    head = to_device(packed.head_positions, device)
    return with_head_input(model, lambda states: states[0].index_select(0, head), use_cache=False, **inputs).logits


def packing_for(config, module, share_prompt: bool) -> Packing:
    """``data.packing`` for a loaded model: the shared-prompt layout where its attention takes a 4D
    mask and no sliding window is shorter than the rows (``model.share_prompt`` true elsewhere is a
    ``ConfigError``; ``auto`` falls back to one sequence per row)."""
    from ..config_values import ConfigError

    attention = module.config._attn_implementation
    window = getattr(module.config, "sliding_window", None)
    blocker = None
    if attention not in MASKED_ATTENTION:
        blocker = f"{attention} takes no custom mask (sdpa and eager do)"
    elif window is not None and window < config.data.max_length:
        blocker = (
            f"the model's sliding window ({window}) is shorter than data.max_length "
            f"({config.data.max_length}) and a custom mask would ignore it"
        )
    if share_prompt and blocker and config.model.share_prompt is True:
        raise ConfigError(
            f"model.share_prompt true with data.packing: {blocker}. Set model.share_prompt "
            f"false (or auto) to pack prompt + chosen and prompt + rejected as two sequences"
        )
    packing = Packing(share_prompt=share_prompt and blocker is None, varlen=attention in VARLEN_ATTENTION)
    announce(packing, attention, blocker if share_prompt else None)
    return packing


_ANNOUNCED: set[str] = set()


def announce(packing: Packing, attention: str, blocker: str | None) -> None:
    """One rank-0 line per layout a run uses."""
    import os

    layout = (
        "each pair prompt, chosen, rejected in one masked sequence (each prompt once)"
        if packing.share_prompt
        else "every response its own sequence" + (f" (prompts not shared: {blocker})" if blocker else "")
    )
    cost = (
        "" if packing.varlen else "; attention spans the whole row (docs/benchmarks.md: slower than padding on a CPU)"
    )
    line = f"[plot_ds] data.packing with {attention}: one row per micro-batch, {layout}{cost}"
    if int(os.environ.get("RANK", "0")) == 0 and line not in _ANNOUNCED:
        _ANNOUNCED.add(line)
        print(line, flush=True)
