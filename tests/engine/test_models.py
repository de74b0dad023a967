import pytest

from plot_ds.config import ConfigError, load_config
from plot_ds.engine.models import mark_zero3_leaf_modules


def tiny_llama(layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def leaf_counts(model):
    from deepspeed.utils import z3_leaf_module

    return {
        type(m).__name__: sum(1 for n in model.modules() if type(n) is type(m) and z3_leaf_module(n))
        for m in model.modules()
        if z3_leaf_module(m)
    }


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("auto", {"LlamaDecoderLayer": 3}),  # the model's own _no_split_modules
        ("LlamaMLP,LlamaAttention", {"LlamaMLP": 3, "LlamaAttention": 3}),
        ("none", {}),
    ],
)
def test_zero3_leaf_modules_mark_whole_layers(setting, expected):
    model = tiny_llama()
    config = load_config(None, {"deepspeed.zero3_leaf_modules": setting})
    marked = mark_zero3_leaf_modules(model, config.deepspeed)
    assert sorted(marked) == sorted(expected) and leaf_counts(model) == expected


def test_zero3_leaf_module_that_is_not_in_the_model_is_refused_with_the_choices():
    config = load_config(None, {"deepspeed.zero3_leaf_modules": "Qwen2DecoderLayer"})
    with pytest.raises(
        ConfigError,
        match="no module of class Qwen2DecoderLayer in LlamaForCausalLM; its module classes are .*LlamaDecoderLayer",
    ):
        mark_zero3_leaf_modules(tiny_llama(), config.deepspeed)


def test_zero3_leaf_modules_auto_warns_for_a_model_that_names_no_layer():
    model = tiny_llama()
    model._no_split_modules = None
    with pytest.warns(UserWarning, match="names no decoder layer class"):
        assert mark_zero3_leaf_modules(model, load_config(None, {}).deepspeed) == []
    assert leaf_counts(model) == {}


def test_tiled_mlps_give_the_whole_mlps_outputs_and_gradients(monkeypatch):
    """model.tiled_mlp: each decoder layer's MLP through DeepSpeed's TiledMLP, slices of hidden_size
    positions (here 3 slices of a 40-position row), recomputed in the backward: the same logits and
    every parameter's gradient as the whole MLPs."""
    import torch
    from deepspeed.runtime.sequence_parallel import ulysses_sp
    from transformers import LlamaConfig, LlamaForCausalLM

    from plot_ds.engine.models import tile_mlps

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    whole = LlamaForCausalLM(config)
    tiled = LlamaForCausalLM(config)
    tiled.load_state_dict(whole.state_dict())
    assert tile_mlps(tiled) == 2 and tile_mlps(tiled) == 0  # each MLP once
    shards = []
    real = ulysses_sp.TiledMLP.apply
    monkeypatch.setattr(ulysses_sp.TiledMLP, "apply", lambda *a: shards.append(a[3]) or real(*a))
    ids = torch.randint(0, 64, (2, 40))
    outputs = []
    for model in (whole, tiled):
        logits = model(input_ids=ids).logits
        (logits.float() ** 2).mean().backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert shards == [3, 3]
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
