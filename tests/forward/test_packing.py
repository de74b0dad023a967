"""Padding-free batches (plot_ds/forward/packing.py): layouts by hand, and packed == padded for the
log-probs, PLOT's losses and every gradient, across model families and attention implementations,
in one process (1 and 2 ZeRO-3 ranks: tests/training/test_training_distributed.py)."""

import pytest
import torch

from plot_ds.config import ConfigError, load_config
from plot_ds.data import collate
from plot_ds.data.tokenize import TokenizedPair
from plot_ds.distributed.embedding_slice import embedding_rows_for
from plot_ds.pair_batch import ResponseTokens
from plot_ds.objectives.objective import build_objective
from plot_ds.pair_batch import GlobalTotals, PairCounts
from plot_ds.forward.packing import CHOSEN, PROMPT, REJECTED, Packing, pack_rows, pack_shared_prompt, packing_for
from plot_ds.forward.pair_forward import ForwardLayout, forward_pairs
from plot_ds.forward.prompt_sharing import SharedLayout, prompt_sharing

# Prompts, chosen and rejected responses of different lengths (a one-token response among them).
BATCH = [
    TokenizedPair("a", [5, 6, 7, 8, 9], [10, 11, 12, 2], [13, 2]),
    TokenizedPair("b", [20, 21], [22, 2], [23, 24, 25, 26, 27, 2]),
    TokenizedPair("c", [30, 31, 32], [2], [33, 34, 2]),
]


def test_rows_packed_one_after_another_with_their_own_positions():
    batch = collate(BATCH[:2], pad_id=0)
    tokens = ResponseTokens.of(batch.labels)
    packed = pack_rows(batch, tokens)
    # rows: a+chosen (9), b+chosen (4), a+rejected (7), b+rejected (8)
    assert packed.input_ids[0].tolist() == [
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        2,
        20,
        21,
        22,
        2,
        5,
        6,
        7,
        8,
        9,
        13,
        2,
        20,
        21,
        23,
        24,
        25,
        26,
        27,
        2,
    ]
    assert packed.position_ids[0].tolist() == [*range(9), *range(4), *range(7), *range(8)]
    assert packed.sequence_lengths.tolist() == [9, 4, 7, 8]
    assert packed.varlen_kwargs()["cu_seq_lens_q"].tolist() == [0, 9, 13, 20, 28]
    assert packed.varlen_kwargs()["max_length_k"] == 9
    # The state predicting each response token holds the token before it.
    ids = packed.input_ids[0]
    assert ids[packed.head_positions + 1].tolist() == tokens.targets.tolist()


def test_shared_prompt_layout_and_its_mask():
    batch = collate(BATCH[:2], pad_id=0)
    tokens = ResponseTokens.of(batch.labels)
    layout = SharedLayout.of(batch)
    packed = pack_shared_prompt(batch, tokens, layout.starts, layout.lengths)
    assert packed.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 2, 13, 2, 20, 21, 22, 2, 23, 24, 25, 26, 27, 2]
    # The rejected response continues the prompt's positions, not the chosen response's.
    assert packed.position_ids[0].tolist() == [*range(9), 5, 6, 0, 1, 2, 3, *range(2, 8)]
    assert (
        packed.part.tolist()
        == [PROMPT] * 5 + [CHOSEN] * 4 + [REJECTED] * 2 + [PROMPT] * 2 + [CHOSEN] * 2 + [REJECTED] * 6
    )
    mask = packed.attention_mask(torch.float32)[0, 0] == 0
    rejected_first = 9  # pair a's rejected "13": sees its prompt and itself only
    assert mask[rejected_first].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 9]
    assert mask[10].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 9, 10]
    assert mask[13].nonzero().flatten().tolist() == [11, 12, 13]  # pair b's chosen: not pair a
    # The predicting states: the token after each is its target, except for a rejected response's
    # first token, predicted by the prompt's last state (shared with the chosen response's first).
    ids, head = packed.input_ids[0], packed.head_positions
    first_rejected = (tokens.rows >= 2) & (tokens.cols == layout.starts[tokens.rows] - 1)
    assert first_rejected.sum() == 2
    assert (packed.part[head[first_rejected]] == PROMPT).all() and (
        packed.part[head[first_rejected] + 1] == CHOSEN
    ).all()
    assert ids[head[~first_rejected] + 1].tolist() == tokens.targets[~first_rejected].tolist()


def tiny_model(family: str, attention: str, **settings):
    import transformers

    small = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=2,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    extra = {
        "Gemma2": dict(head_dim=8),
        "Qwen3": dict(head_dim=8),
        "Mixtral": dict(num_local_experts=4),
        "Phi3": dict(tie_word_embeddings=False),
    }.get(family, {})
    config = getattr(transformers, f"{family}Config")(**{**small, **extra, **settings})
    config._attn_implementation = attention
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForCausalLM")(config).float()


def loss_path(model, layout, overrides):
    """Loss, log-probs and every gradient of one DPO + PLOT step on ``BATCH`` (the model is its own
    reference, offset so that the log-ratios are not zero)."""
    config = load_config(None, overrides)
    objective = build_objective(config, embedding_rows_for(model, config.plot))
    batch = collate(BATCH, pad_id=2)
    model.zero_grad()
    with torch.no_grad():
        reference = forward_pairs(model, batch, objective.needs.reference_logits, 0, ForwardLayout(layout))
        reference.logps.chosen += torch.tensor([0.3, -0.2, 0.1])
    policy = forward_pairs(model, batch, objective.needs.policy_logits, objective.needs.top_k, ForwardLayout(layout))
    loss, metrics = objective(policy, reference, GlobalTotals.from_counts(batch.counts))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), policy.logps, metrics, grads


PLOT = {"objective.name": "dpo", "plot.top_k": 5, "plot.rejected_weight": 0.5}
FAMILIES = [
    ("Llama", "sdpa"),
    ("Llama", "eager"),
    ("Qwen2", "sdpa"),
    ("Qwen3", "sdpa"),
    ("Mistral", "sdpa"),
    ("Phi3", "eager"),
    ("Mixtral", "sdpa"),
    ("Gemma2", "eager"),
]


@pytest.mark.parametrize("share_prompt", [False, True], ids=["rows", "shared-prompt"])
@pytest.mark.parametrize("family,attention", FAMILIES, ids=[f"{f}-{a}" for f, a in FAMILIES])
def test_packed_equals_padded(family, attention, share_prompt):
    """Float32; tolerance 1e-5 relative (sums in another order), the same on every family."""
    model = tiny_model(family, attention)
    padded = loss_path(model, None, PLOT)
    packed = loss_path(model, Packing(share_prompt=share_prompt, varlen=False), PLOT)
    assert padded[0] > 0 and padded[2]["plot/w_chosen"] > 0
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(packed[1].chosen, padded[1].chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1].rejected, padded[1].rejected, rtol=1e-5, atol=1e-5)
    for metric in ("loss/plot", "plot/w_chosen", "plot/w_rejected", "loss/dpo"):
        assert float(packed[2][metric]) == pytest.approx(float(padded[2][metric]), rel=1e-5, abs=1e-7)
    assert packed[3].keys() == padded[3].keys()
    for name, grad in padded[3].items():
        torch.testing.assert_close(
            packed[3][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=lambda m: f"{name}: {m}"
        )


def test_packed_rows_respect_a_sliding_window_shorter_than_the_rows():
    """Mistral with a 3-token window: transformers' packed-sequence mask keeps each window inside
    its sequence, as padded rows do."""
    model = tiny_model("Mistral", "sdpa", sliding_window=3)
    padded = loss_path(model, None, PLOT)
    packed = loss_path(model, Packing(share_prompt=False, varlen=False), PLOT)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-7)
    for name, grad in padded[3].items():
        torch.testing.assert_close(packed[3][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


def test_packed_equals_prompt_sharing_passes_and_the_whole_vocabulary():
    model = tiny_model("Llama", "sdpa")
    overrides = {**PLOT, "plot.top_k": 0}
    passes = loss_path(model, prompt_sharing(model, True), overrides)
    packed = loss_path(model, Packing(share_prompt=True, varlen=False), overrides)
    torch.testing.assert_close(packed[0], passes[0], rtol=1e-5, atol=1e-7)
    for name, grad in passes[3].items():
        torch.testing.assert_close(packed[3][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


def test_a_filler_batch_packs():
    """A rank with no pair left runs the filler pair (weight 0) like any other: every layout
    computes its log-probs as the padded rows do, it counts nothing, and weighted by 0 its loss
    reaches every parameter (ZeRO-3's hooks need each rank in each forward and backward) with
    a gradient of exactly 0."""
    model = tiny_model("Llama", "sdpa")
    filler = collate([], pad_id=2, filler=BATCH[0])
    assert filler.filler and filler.weight == 0.0 and filler.pair_ids == []
    assert filler.counts == PairCounts(micro_batches=1)  # no pairs or tokens, one micro-batch
    real = collate(BATCH[:1], pad_id=2)
    objective = build_objective(load_config(None, PLOT), embedding_rows_for(model, load_config(None, PLOT).plot))
    for layout in (None, Packing(share_prompt=True, varlen=False), Packing(share_prompt=False, varlen=False)):
        with torch.no_grad():
            expected = forward_pairs(model, real, keep_logits=False).logps
            reference = forward_pairs(model, filler, objective.needs.reference_logits, 0, ForwardLayout(layout))
        model.zero_grad(set_to_none=True)
        out = forward_pairs(model, filler, objective.needs.policy_logits, objective.needs.top_k, ForwardLayout(layout))
        torch.testing.assert_close(out.logps.chosen, expected.chosen, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logps.rejected, expected.rejected, rtol=1e-5, atol=1e-5)
        # The totals of a global batch whose other micro-batches hold one real pair.
        totals = GlobalTotals.from_counts(filler.counts + real.counts)
        loss, _ = objective(out, reference, totals)
        assert torch.isfinite(loss) and loss.requires_grad
        (loss * filler.weight).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
        assert all(not g.any() for g in grads.values())


def config_for(**overrides):
    return load_config(None, {"data.packing": True, "data.max_length": 256, **overrides})


def test_layout_chosen_for_the_model():
    llama = tiny_model("Llama", "sdpa")
    assert packing_for(config_for(), llama, share_prompt=True) == Packing(share_prompt=True, varlen=False)
    assert packing_for(config_for(), llama, share_prompt=False) == Packing(share_prompt=False, varlen=False)
    llama.config._attn_implementation = "flash_attention_2"  # no custom mask: rows, varlen kernels
    assert packing_for(config_for(), llama, share_prompt=True) == Packing(share_prompt=False, varlen=True)
    with pytest.raises(ConfigError, match="model.share_prompt true with data.packing: flash_attention_2"):
        packing_for(config_for(**{"model.share_prompt": True}), llama, share_prompt=True)
    windowed = tiny_model("Mistral", "sdpa", sliding_window=64)
    assert packing_for(config_for(), windowed, share_prompt=True).share_prompt is False
    with pytest.raises(ConfigError, match=r"sliding window \(64\) is shorter than data.max_length \(256\)"):
        packing_for(config_for(**{"model.share_prompt": True}), windowed, share_prompt=True)


def test_varlen_attention_gets_the_sequence_bounds():
    """As flash attention's varlen kernels see it: an attention function that reads only the
    ``cu_seq_lens`` it is handed (no mask) and attends causally inside each sequence."""
    from transformers import AttentionInterface

    seen = []

    def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        bounds = kwargs["cu_seq_lens_q"].tolist()
        assert attention_mask is None and kwargs["cu_seq_lens_k"].tolist() == bounds
        seen.append(bounds)
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        out = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
                )
                for a, b in zip(bounds[:-1], bounds[1:])
            ],
            dim=2,
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("test_varlen", varlen_attention)
    model = tiny_model("Llama", "sdpa")
    padded = loss_path(model, None, PLOT)
    model.config._attn_implementation = "test_varlen"
    packed = loss_path(model, Packing(share_prompt=False, varlen=True), PLOT)
    assert seen and all(bounds == seen[0] for bounds in seen) and len(seen[0]) == 2 * len(BATCH) + 1
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-7)
    for name, grad in padded[3].items():
        torch.testing.assert_close(packed[3][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


def test_a_model_that_attends_across_packed_sequences_is_refused():
    """An attention that ignores the packed row's boundaries (as a model whose masking ignores
    restarting position_ids would): check_packing sees the logits differ and refuses, naming it."""
    from transformers import AttentionInterface

    from plot_ds.errors import ModelError
    from plot_ds.forward.pair_forward import check_packing

    def causal_only(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # transformers builds no mask for an attention it does not know: right-padded rows are still
        # right under a causal mask, a packed row is not.
        assert attention_mask is None
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("test_causal_only", causal_only)
    model = tiny_model("Llama", "sdpa")
    check_packing(model, Packing(share_prompt=False, varlen=False))
    check_packing(model, Packing(share_prompt=True, varlen=False))
    model.config._attn_implementation = "test_causal_only"
    with pytest.raises(
        ModelError, match="data.packing: LlamaForCausalLM with test_causal_only attention does not keep"
    ):
        check_packing(model, Packing(share_prompt=False, varlen=False))


def test_the_check_runs_in_eval_mode_and_restores_training():
    from plot_ds.forward.pair_forward import check_packing

    model = tiny_model("Llama", "sdpa", attention_dropout=0.5)
    model.train()
    check_packing(model, Packing(share_prompt=True, varlen=False))
    assert model.training
