"""A model's forward over a collated batch of pairs: chosen and rejected rows together, sharing
their prompts (``prompt_sharing``) or packed into one row (``packing``), the LM head only on the
positions that predict a response token (a pre-hook hands it those hidden states: prompt and
padding positions never reach the vocabulary projection), then ``logprobs.pair_outputs``.

How an engine lays out its rows (``RowLayout``: prompt sharing, packing or plain padded rows) is
decided when it is built (``engine``) and handed here explicitly.
"""

from __future__ import annotations

import torch

from .logprobs import PairOutputs, ResponseTokens, pair_outputs, to_device, with_head_input
from .packing import Packing, packed_logits
from ..pair_batch import PairBatch
from .prompt_sharing import PromptSharing, shared_prompt_logits

RowLayout = PromptSharing | Packing | None


def response_logits(model, input_ids, attention_mask, tokens: ResponseTokens) -> torch.Tensor:
    """[N, V] logits at the response positions of full rows."""
    return with_head_input(
        model, tokens.select, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).logits


def head_logits(model, batch: PairBatch, layout: RowLayout = None) -> tuple[torch.Tensor, ResponseTokens]:
    """The [N, V] logits at the response positions of a collated batch, and those positions."""
    device = model.device
    cpu_tokens = ResponseTokens.of(batch.labels)
    logits = None
    if isinstance(layout, Packing):
        logits = packed_logits(model, batch, cpu_tokens, device, layout)
    elif isinstance(layout, PromptSharing):
        logits = shared_prompt_logits(model, batch, cpu_tokens, device, layout)
    tokens = cpu_tokens.to(device)
    if logits is None:
        logits = response_logits(
            model, to_device(batch.input_ids, device), to_device(batch.attention_mask, device), tokens
        )
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


def forward_pairs(model, batch: PairBatch, keep_logits: bool, top_k: int = 0, layout: RowLayout = None) -> PairOutputs:
    """One forward over the chosen and rejected rows of a collated batch. ``keep_logits`` keeps the
    [N, V] logits; ``top_k`` > 0 reads each position's top-k ``SupportLogits`` in the log-prob pass;
    ``layout``: each prompt computed once, or the rows packed."""
    return pair_outputs(*head_logits(model, batch, layout), keep_logits, top_k)
