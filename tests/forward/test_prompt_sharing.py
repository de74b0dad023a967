"""Prompt sharing: the prompt once, the responses over copies of its cache, the same logits and
gradients as full rows."""

import pytest
import torch

import plot_ds.forward.prompt_sharing as prompt_sharing_module
from plot_ds.config import load_config
from plot_ds.data import collate
from plot_ds.engine.ds_config import load_ds_config, reference_ds_config
from plot_ds.data.tokenize import TokenizedPair
from plot_ds.forward.pair_forward import ForwardLayout, forward_pairs
from plot_ds.forward.prompt_sharing import (
    cache_argument,
    cache_rows,
    copyable,
    prompt_sharing,
    response_groups,
)
from plot_ds.engine.engines import shares_prompt


def record_passes(monkeypatch) -> list:
    """The input shapes of the shared-prompt passes that really ran (full rows record nothing)."""
    passes = []
    real = prompt_sharing_module.with_head_input
    monkeypatch.setattr(
        prompt_sharing_module, "with_head_input", lambda *a, **k: passes.append(k["input_ids"].shape) or real(*a, **k)
    )
    return passes


@pytest.mark.parametrize("grouped", [True, False], ids=["length-groups-over-cache-copies", "one-pass-repeated-cache"])
def test_shared_prompt_forward_equals_the_full_rows(tiny_model_dir, monkeypatch, grouped):
    """Prompts of different lengths (left-padded in the prompt pass), responses of different
    lengths (one of a single token), padding: log-probs, logits and gradients as the plain forward,
    both with the responses in two passes of similar lengths over copies of the prompt cache, and
    in one pass over the cache repeated in place (caches a copy could change)."""
    from transformers import AutoModelForCausalLM

    passes = record_passes(monkeypatch)
    if not grouped:
        monkeypatch.setattr(prompt_sharing_module, "copyable", lambda cache: False)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    pairs = [
        TokenizedPair("a", [5, 6, 7, 8, 9], [10, 11, 12, 2], [13, 2]),
        TokenizedPair("b", [20, 21], [22, 2], [23, 24, 25, 26, 27, 2]),
        TokenizedPair("c", [30, 31, 32], [2], [33, 34, 2]),
    ]
    batch = collate(pairs, pad_id=2)
    results = {}
    for shared in (False, True):
        model.zero_grad()
        passes.clear()
        out = forward_pairs(model, batch, keep_logits=True, layout=ForwardLayout(prompt_sharing(model, shared)))
        (out.logps.chosen.sum() - 0.5 * out.logps.rejected.sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[shared] = (out, grads)
    (plain, plain_grads), (shared, shared_grads) = results[False], results[True]
    # Prompts (3 x 5); then the responses of lengths 1, 2, 2 (3 x 2) and 3, 4, 6 (3 x 6): 24 tokens,
    # where chosen-then-rejected would pad to 3 x 4 + 3 x 6 = 30; or all six padded to 6 in one pass.
    expected = [(3, 5), (3, 2), (3, 6)] if grouped else [(3, 5), (6, 6)]
    assert passes == [torch.Size(shape) for shape in expected]
    assert torch.isfinite(shared.logits).all()
    torch.testing.assert_close(shared.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.logps.chosen, plain.logps.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.logps.rejected, plain.logps.rejected, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == shared_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("window", [3, 6])
def test_shared_prompt_over_a_sliding_window_cache_equals_the_full_rows(window, monkeypatch):
    """Sliding-window layers keep only the last window of the prompt: the copies of the prompt
    rows still give each response what full rows give it (windows shorter than the prompts)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        max_position_embeddings=128,
        pad_token_id=2,
        eos_token_id=2,
    )
    model = MistralForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    cache = getattr(model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), use_cache=True), cache_argument(model))
    assert {type(layer).__name__ for layer in cache.layers} == {"DynamicSlidingWindowLayer"} and copyable(cache)
    passes = record_passes(monkeypatch)
    batch = collate(
        [
            TokenizedPair("a", [5, 6, 7, 8, 9], [10, 11, 12, 2], [13, 2]),
            TokenizedPair("b", [20, 21], [22, 2], [23, 24, 25, 26, 27, 2]),
            TokenizedPair("c", [30, 31, 32], [2], [33, 34, 2]),
        ],
        pad_id=2,
    )
    results = {}
    for shared in (False, True):
        model.zero_grad()
        sharing = prompt_sharing(model, shared)
        assert (sharing is not None) is shared
        passes.clear()
        out = forward_pairs(model, batch, keep_logits=True, layout=ForwardLayout(sharing))
        out.logps.chosen.sum().backward()
        results[shared] = (out.logits, {n: p.grad.clone() for n, p in model.named_parameters()})
        # Shared: the prompts (3 x 5), then responses of lengths 1, 2, 2 and 3, 4, 6 over copies of the
        # sliding-window cache; plain: the six full rows.
        assert passes == ([torch.Size(s) for s in [(3, 5), (3, 2), (3, 6)]] if shared else [])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_response_groups_split_rows_sorted_by_length_where_padding_is_least():
    def padded(groups, lengths):
        return sum(len(g) * int(lengths[g].max()) for g in groups)

    lengths = torch.tensor([4, 2, 1, 2, 6, 3])
    groups = response_groups(lengths)
    assert [sorted(g.tolist()) for g in groups] == [[1, 2, 3], [0, 4, 5]] and padded(groups, lengths) == 24
    # Two passes even where one would pad no more (every ZeRO-3 rank must run as many); ties balanced.
    assert [g.tolist() for g in response_groups(torch.tensor([5, 5, 5, 5]))] == [[0, 1], [2, 3]]
    assert [g.tolist() for g in response_groups(torch.tensor([1, 10, 1, 1]))] == [[0, 2, 3], [1]]
    # Never more padding than chosen-then-rejected: random lengths.
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        pairs = int(torch.randint(1, 9, (1,), generator=generator))
        lengths = torch.randint(1, 300, (2 * pairs,), generator=generator)
        groups = response_groups(lengths)
        assert len(groups) == 2 and sorted(torch.cat(groups).tolist()) == list(range(2 * pairs))
        assert padded(groups, lengths) <= padded([torch.arange(pairs), torch.arange(pairs, 2 * pairs)], lengths)


def test_a_copy_of_the_prompt_cache_leaves_it_as_it_was(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    argument = cache_argument(model)
    cache = getattr(model(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), use_cache=True), argument)
    assert copyable(cache)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    rows = cache_rows(cache, torch.tensor([1, 1, 0]), copied=True)
    model(input_ids=torch.tensor([[1], [2], [3]]), use_cache=True, **{argument: rows})
    assert rows.get_seq_length() == 4 and rows.layers[0].keys.shape[0] == 3
    for layer, (keys, values) in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    torch.testing.assert_close(rows.layers[0].keys[:2, :, :3], before[0][0][[1, 1]])


def test_prompt_sharing_is_refused_aloud_without_a_cache_argument(tiny_model_dir):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    class NoCache(torch.nn.Module):
        config = SimpleNamespace(is_encoder_decoder=False)

        def forward(self, input_ids, attention_mask=None):
            return input_ids

    model = NoCache()
    with pytest.warns(UserWarning, match="NoCache takes no key/value cache"):
        assert prompt_sharing(model, True) is None
    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # transformers >= 5.2x names it "cache", earlier "past_key_values"
    assert prompt_sharing(llama, True).cache_argument in ("cache", "past_key_values")
    assert prompt_sharing(llama, False) is None


@pytest.mark.parametrize(
    "setting, ds_file, ranks, shared",
    [
        ("auto", "zero2.json", 1, True),
        ("auto", "zero2.json", 4, True),
        ("auto", "zero3.json", 1, True),  # one rank: ZeRO-3's gathers are local copies
        ("auto", "zero3.json", 2, False),  # each pass would all-gather and reduce-scatter again
        (True, "zero3.json", 2, True),
        (False, "zero2.json", 1, False),
    ],
)
def test_prompt_sharing_auto_is_off_where_zero3_fetches_the_weights_per_pass(
    monkeypatch, setting, ds_file, ranks, shared
):
    import deepspeed.comm

    monkeypatch.setattr(deepspeed.comm, "is_initialized", lambda: True)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *_, **__: ranks)
    config = load_config(None, {"model.share_prompt": setting, "deepspeed.config": f"ds_configs/{ds_file}"})
    ds = load_ds_config(config, world_size=ranks)
    assert shares_prompt(config, ds) is shared
    assert shares_prompt(config, reference_ds_config(ds, offload=False)) is shared
    if ds_file == "zero3.json":  # a reference offloaded to host memory: each pass would fetch it again
        assert shares_prompt(config, reference_ds_config(ds, offload=True)) is (setting is True)
