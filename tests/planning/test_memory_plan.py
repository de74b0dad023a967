"""The memory plan's parts, each checked by hand (or by counting what autograd saves) on tiny
configurations; the plan against measured peaks is bench/memory_plan.py (docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from plot_ds.config import load_config
from plot_ds.planning.memory_plan import GIB, DataLengths, Machine, plan_memory, trained_and_frozen
from plot_ds.planning.model_shape import shape_of
from plot_ds.planning.model_states import ZeroSettings, frozen_weights, gathered_bytes, trained_states
from plot_ds.planning.step_memory import (
    MicroBatchShape,
    StepSettings,
    activation_bytes,
    head_bytes,
    layer_bytes_per_token,
    plot_bytes,
)

SMALL = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def tiny_config(family: str, layers: int, **settings):
    from transformers import AutoConfig

    values = {"vocab_size": 300, "max_position_embeddings": 256, **SMALL, **settings}
    return AutoConfig.for_model(family, num_hidden_layers=layers, **values)


def step_settings(element_size: int, **changes) -> StepSettings:
    values = dict(
        element_size=element_size,
        gradient_checkpointing=False,
        tiled_mlp=False,
        tiled_head=False,
        tile_positions=64,
        eager_attention=False,
        sequence=1,
        lora_rank=0,
        lora_dropout=0.0,
        lora_targets=None,
        linear_keeps_inputs=False,
        plot_active=True,
        plot_support=9,
        plot_closed_form=True,
        reference_logits=False,
    )
    return StepSettings(**{**values, **changes})


def saved_bytes(hf_config, dtype, attention: str, rows: int, width: int, checkpointing: bool = False) -> int:
    from transformers import AutoModelForCausalLM

    hf_config._attn_implementation = attention
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config).to(dtype).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return count_saved(model, rows, width)


def count_saved(model, rows: int, width: int) -> int:
    """Bytes autograd saves for the backward in a forward of the model's decoder layers (the head
    replaced by the identity), each storage counted once, parameters left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.get_output_embeddings().forward = lambda hidden: hidden
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=torch.randint(0, 300, (rows, width)), use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize(
    "family, dtype, attention",
    [
        ("llama", torch.float32, "sdpa"),
        ("llama", torch.bfloat16, "sdpa"),
        ("qwen3", torch.bfloat16, "sdpa"),
        ("mistral", torch.float32, "eager"),
        ("mistral", torch.bfloat16, "eager"),
    ],
)
def test_the_layer_rules_count_what_autograd_saves(family, dtype, attention):
    """One decoder layer's saved tensors, as the difference of a 2-layer and a 1-layer model, equal
    ``layer_bytes_per_token`` x positions exactly: Llama's in float32 and bf16, Qwen3's per-head
    query/key norms, eager attention's probabilities."""
    rows, width = 2, 24
    element_size = torch.finfo(dtype).bits // 8
    shape = shape_of(tiny_config(family, 1))
    settings = step_settings(element_size, eager_attention=attention == "eager")
    one, two = (saved_bytes(tiny_config(family, n), dtype, attention, rows, width) for n in (1, 2))
    assert two - one == layer_bytes_per_token(shape, settings, width) * rows * width


def test_checkpointing_keeps_each_layers_input_only():
    rows, width = 2, 24
    shape = shape_of(tiny_config("llama", 1))
    one, two = (saved_bytes(tiny_config("llama", n), torch.float32, "sdpa", rows, width, True) for n in (1, 2))
    settings = step_settings(4, gradient_checkpointing=True)
    batch = MicroBatchShape(rows, width, 0, rows * width)
    kept_one = activation_bytes(shape, settings, batch)[0]
    assert two - one == rows * width * 64 * 4  # [rows, width, d] float32 per layer
    assert activation_bytes(shape_of(tiny_config("llama", 2)), settings, batch)[0] - kept_one == two - one


def test_the_model_shape_is_read_from_the_config_alone():
    shape = shape_of(tiny_config("qwen3", 3, tie_word_embeddings=False))
    hand = 2 * 300 * 64 + 64  # embeddings, head, final norm
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 160 + 2 * 64 + 2 * 16  # q, k+v, o, MLP, norms, q/k norms
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.qk_norm) == (3, 4, 2, 16, True)
    assert shape.layer_parameters == layer and shape.parameters == hand + 3 * layer
    assert not shape.tied_embeddings and shape.why_head_not_tiled is None
    assert shape_of(tiny_config("gemma2", 1, final_logit_softcapping=30.0)).why_head_not_tiled


def test_zero_states_by_hand():
    """ZeRO-3 on 4 ranks, bf16: each parameter's partition rounded up, those under the persistence
    threshold whole as well; gradients a bf16 partition; float32 master + 2 Adam moments; the flat
    gradient and its float32 copy at the step. ZeRO-2: whole weights, a partition of the rest."""
    sizes = [10, 7, 1001]
    zero3 = ZeroSettings(3, 4, 2, 100, 50, 10, 10**9, False, False)
    mine = 3 + 2 + 251
    states = trained_states(sizes, [], zero3)
    assert states.parameters == (mine + 10 + 7) * 2
    assert (states.gradients, states.optimizer, states.buckets) == (mine * 2, mine * 12, 200)
    assert states.step_transient == mine * 6
    zero2 = ZeroSettings(2, 4, 4, 100, 50, 10, 10**9, False, False)
    states = trained_states(sizes, [50], zero2)
    mine = -(-1018 // 8) * 8 // 4  # padded to 2 x ranks, then split
    assert states.parameters == (1018 + 50) * 4 and states.optimizer == mine * 12
    assert states.step_transient == mine * 4  # a float32 model's flat gradient is already float32
    offloaded = trained_states(sizes, [], ZeroSettings(3, 4, 2, 100, 50, 10, 10**9, True, True))
    fp32 = trained_states(sizes, [], ZeroSettings(3, 4, 4, 100, 50, 10, 10**9, False, False))
    assert fp32.optimizer == mine * 8 and fp32.step_transient == 0  # the partition is its own master
    assert offloaded.optimizer == 0 and offloaded.parameters == (10 + 7) * 2
    assert offloaded.host == (3 + 2 + 251) * (12 + 2 + 4) + (3 + 2 + 251) * 2
    assert frozen_weights(sizes, ZeroSettings(0, 4, 2, 100, 50, 10, 10**9, False, False)) == 1018 * 2


def test_gathered_parameters_by_hand():
    """ZeRO-3 keeps gathered what the last step's trace uses again within the reuse distance: with
    layers of 100 elements, a head of 300 and a distance of 1000, the head and the last 4 layers
    (2 x 3 layers + the head < 1000); with the head's whole gradient. One rank gathers nothing."""
    zero = ZeroSettings(3, 4, 2, 100, 50, 10, 1000, False, False)
    assert gathered_bytes(100, 300, 10, zero) == (300 + 4 * 100 + 300) * 2
    short = ZeroSettings(3, 4, 2, 100, 50, 10, 300, False, False)  # nothing kept: a layer, its prefetch
    assert gathered_bytes(100, 300, 10, short) == (300 + 100 + 50 + 300) * 2
    assert gathered_bytes(100, 300, 10, ZeroSettings(3, 1, 2, 100, 50, 10, 1000, False, False)) == 300 * 2


def test_the_head_and_plot_by_hand():
    shape = shape_of(tiny_config("llama", 1, vocab_size=1000))
    whole = step_settings(2)
    kept, backward = head_bytes(shape, whole, 100)
    assert kept == 100 * (1000 * 2 + 64 * 2) + 100 * 9 * 12  # logits, hidden, support ids + logits
    assert backward == 100 * 1000 * 8  # a chunk of float32 logits and their softmax
    tiled = step_settings(2, tiled_head=True, tile_positions=32)
    kept, backward = head_bytes(shape, tiled, 100)
    assert kept == 100 * 64 * 2 + 100 * 9 * 12
    assert backward == 1000 * 64 * 4 + 32 * 1000 * (2 + 8)
    assert plot_bytes(shape, whole, 100) == 100 * 9 * 12 + 100 * 64 * 4
    solver = step_settings(2, plot_closed_form=False)
    assert plot_bytes(shape, solver, 100) - plot_bytes(shape, whole, 100) == 100 * 9 * 64 * 4 + 3 * 100 * 81 * 4


@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_lora_rules_count_what_autograd_saves(dropout):
    """A decoder layer with LoRA on every linear, as the difference of a 3-layer and a 2-layer model
    (the first layer's input needs no gradient under LoRA): the adapters' intermediates, with dropout
    its output and mask, less what the frozen norms and linears no longer keep."""
    from peft import LoraConfig, get_peft_model

    def saved_with_adapters(layers: int) -> int:
        config = tiny_config("llama", layers)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
        return count_saved(get_peft_model(model, lora).train(), rows=2, width=24)

    shape = shape_of(tiny_config("llama", 1))
    settings = step_settings(4, lora_rank=8, lora_dropout=dropout)
    assert saved_with_adapters(3) - saved_with_adapters(2) == layer_bytes_per_token(shape, settings, 24) * 48


def test_lora_trains_its_adapters_only():
    config = load_config(None, {"adapter.method": "lora", "adapter.rank": 4, "adapter.target_modules": ["q_proj"]})
    shape = shape_of(tiny_config("llama", 2))
    trained, frozen = trained_and_frozen(config, shape)
    assert trained == [4 * 64, 64 * 4] * 2 and frozen == list(shape.parameter_sizes)


def test_sequence_parallelism_splits_each_row():
    batch = MicroBatchShape(4, 1001, 3000, 4004).per_rank(4)
    assert (batch.width, batch.tokens, batch.response_positions) == (251, 1004, 750)


def test_the_plan_peaks_where_the_largest_phase_is(tmp_path):
    folder = tmp_path / "model"
    tiny_config("llama", 2).save_pretrained(folder)
    config = load_config(None, {"model.name_or_path": str(folder), "train.micro_batch_size": 2})
    shape = shape_of(tiny_config("llama", 2))
    lengths = DataLengths(((10, 30, 20), (40, 100, 90), (5, 5, 5)))
    plan = plan_memory(config, shape, Machine(ranks=1, device="gpu", device_memory_gb=2.0), lengths)
    batch = plan.settings["micro_batch"]
    # The two longest pairs; one rank under ZeRO-3 without offload shares the prompt.
    assert (batch.rows, batch.width, batch.response_positions) == (4, 140, 240)
    assert batch.tokens == 2 * (40 + 2 * 100)
    assert plan.peak_gb == max(plan.phase_bytes(p) for p in plan.phases) / GIB
    assert plan.fits is True
    tight = plan_memory(config, shape, Machine(ranks=1, device="gpu", device_memory_gb=plan.peak_gb * 0.99), lengths)
    assert tight.fits is False
    cached = plan_memory(load_config(None, {"reference.mode": "cache"}), shape, Machine(ranks=1), lengths)
    assert cached.parts["reference"].bytes == 0 and "the reference cache pass" in cached.phases
    assert cached.parts["cache pass"].bytes > plan.parts["reference"].bytes  # the engine and its forward
