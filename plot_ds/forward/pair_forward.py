"""A model's forward over a collated batch of pairs: chosen and rejected rows together, sharing
their prompts (``prompt_sharing``) or packed into one row (``packing``), the LM head only on the
positions that predict a response token (a pre-hook hands it those hidden states: prompt and
padding positions never reach the vocabulary projection), then ``logprobs.pair_outputs``.

How an engine lays out its forward (``ForwardLayout``: prompt sharing, packing or plain padded rows;
the LM head tiled or whole) is decided when it is built (``engine.engines``) and handed here
explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .logprobs import move_tokens, pair_outputs, to_device, with_head_input

from ..pair_batch import PairLogps, PairOutputs, ResponseTokens, SupportLogits
from .packing import Packing, packed_logits
from ..pair_batch import PairBatch
from .prompt_sharing import PromptSharing, shared_prompt_logits
from .sequence_parallel import SequenceGroup
from .tiled_head import TiledOutputs, tiled_head


@dataclass(frozen=True)
class ForwardLayout:
    """How an engine's forward lays out a batch: its rows (prompt sharing, packing, or None: plain
    padded rows), its LM head (``head_tile`` positions at a time, ``tiled_head``, where a batch's
    response positions exceed ``tiled_above``; 0: always the whole [N, V] head), and under sequence
    parallelism this rank's ``sequence`` group (plain rows only)."""

    rows: PromptSharing | Packing | None = None
    head_tile: int = 0
    tiled_above: int = 0
    sequence: SequenceGroup | None = None

    def tiles(self, positions: int, keep_logits: bool) -> bool:
        return bool(self.head_tile) and not keep_logits and positions > self.tiled_above


def response_logits(model, batch: PairBatch, tokens: ResponseTokens) -> torch.Tensor:
    """[N, V] logits at the response positions of plain rows (or of slices of them, at their
    ``position_ids``: the attention then sees whole rows, and their padding only follows them)."""
    device = model.device
    inputs = {"input_ids": to_device(batch.input_ids, device), "use_cache": False}
    if batch.position_ids is None:
        inputs["attention_mask"] = to_device(batch.attention_mask, device)
    else:
        inputs["position_ids"] = to_device(batch.position_ids, device)
    return with_head_input(model, tokens.select, **inputs).logits


def head_logits(
    model, batch: PairBatch, rows: PromptSharing | Packing | None = None, cpu_tokens: ResponseTokens | None = None
) -> tuple[torch.Tensor, ResponseTokens]:
    """The head's output at the response positions of a collated batch ([N, V] logits, or what a
    ``tiled_head`` makes of them), and those positions."""
    device = model.device
    cpu_tokens = ResponseTokens.of(batch.labels) if cpu_tokens is None else cpu_tokens
    logits = None
    if isinstance(rows, Packing):
        logits = packed_logits(model, batch, cpu_tokens, device, rows)
    elif isinstance(rows, PromptSharing):
        logits = shared_prompt_logits(model, batch, cpu_tokens, device, rows)
    tokens = move_tokens(cpu_tokens, device)
    if logits is None:
        logits = response_logits(model, batch, tokens)
    return logits, tokens


def check_packing(model, packing: Packing) -> None:
    """Refuse ``data.packing`` for a model that would attend across the sequences of a packed row
    (one whose masking ignores restarting ``position_ids``, or a 4D mask): on a two-pair probe the
    packed logits must be the padded ones. Every rank runs it alike (ZeRO-3 gathers inside)."""
    from ..data import collate
    from ..data.tokenize import TokenizedPair
    from ..errors import ModelError

    module = getattr(model, "module", model)
    ids = [(7 * i + 3) % module.config.vocab_size for i in range(23)]
    probe = collate(
        [TokenizedPair("a", ids[:5], ids[5:9], ids[9:12]), TokenizedPair("b", ids[12:15], ids[15:17], ids[17:23])],
        pad_id=ids[0],
    )
    training = module.training
    module.eval()  # dropout would make the two differ
    try:
        with torch.no_grad():
            padded, _ = head_logits(model, probe)
            packed, _ = head_logits(model, probe, packing)
    finally:
        module.train(training)
    difference = float((packed.float() - padded.float()).abs().max())
    scale = float(padded.float().abs().max())
    tolerance = 1e-4 if padded.dtype == torch.float32 else 3e-2
    if not difference <= tolerance * max(scale, 1.0):
        attention = module.config._attn_implementation
        raise ModelError(
            f"data.packing: {type(module).__name__} with {attention} attention does not keep "
            f"attention inside each packed sequence (packed logits differ from padded ones by "
            f"{difference:.3g}, at most {scale:.3g}); set data.packing false, or try "
            f"model.attn_implementation sdpa or flash_attention_2"
        )


def forward_pairs(
    model, batch: PairBatch, keep_logits: bool, top_k: int = 0, layout: ForwardLayout = ForwardLayout()
) -> PairOutputs:
    """One forward over the chosen and rejected rows of a collated batch. ``keep_logits`` keeps the
    [N, V] logits; ``top_k`` > 0 reads each position's top-k ``SupportLogits`` in the log-prob pass;
    ``layout``: each prompt computed once or the rows packed, the head tiled or whole, and the rows
    split over a sequence group (the outputs then hold this rank's positions, and each pair's
    log-probs summed over the group)."""
    cpu_tokens = ResponseTokens.of(batch.labels)
    if layout.sequence is not None:
        batch, cpu_tokens = layout.sequence.shard(batch, cpu_tokens)
    if not layout.tiles(cpu_tokens.targets.numel(), keep_logits):
        outputs = pair_outputs(*head_logits(model, batch, layout.rows, cpu_tokens), keep_logits, top_k)
    else:
        targets = to_device(cpu_tokens.targets, model.device)
        with tiled_head(model, targets, top_k, layout.head_tile):
            packed, tokens = head_logits(model, batch, layout.rows, cpu_tokens)
        out = TiledOutputs.unpack(packed, top_k)
        logps = PairLogps.from_rows(tokens.row_sums(out.logps), tokens.row_counts())
        support = SupportLogits(out.support_ids, out.support_logits) if top_k else None
        outputs = PairOutputs(logps, None, tokens, support)
    return outputs if layout.sequence is None else layout.sequence.pair_sums(outputs)
