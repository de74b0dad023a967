"""The memory plan's parts, each checked by hand (or by counting what autograd saves) on tiny
configurations; the plan against measured peaks is bench/memory_plan.py (docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch

from plot_ds.config import load_config
from plot_ds.planning.memory_plan import GIB, DataLengths, Machine, plan_memory, trained_and_frozen
from plot_ds.planning.model_shape import shape_of
from plot_ds.planning.model_states import ZeroSettings, frozen_weights, trained_states
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
        plot_active=True,
        plot_support=9,
        plot_closed_form=True,
        reference_logits=False,
    )
    return StepSettings(**{**values, **changes})


def saved_bytes(hf_config, dtype, attention: str, rows: int, width: int, checkpointing: bool = False) -> int:
    """Bytes autograd saves for the backward in a forward of the model's decoder layers (the head
    replaced by the identity), each storage counted once, parameters left out."""
    from transformers import AutoModelForCausalLM

    hf_config._attn_implementation = attention
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config).to(dtype).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    zero3 = ZeroSettings(3, 4, 2, 100, 50, 10, False, False)
    mine = 3 + 2 + 251
    states = trained_states(sizes, [], zero3)
    assert states.parameters == (mine + 10 + 7) * 2
    assert (states.gradients, states.optimizer, states.buckets) == (mine * 2, mine * 12, 200)
    assert states.step_transient == mine * 6
    zero2 = ZeroSettings(2, 4, 4, 100, 50, 10, False, False)
    states = trained_states(sizes, [50], zero2)
    mine = -(-1018 // 8) * 8 // 4  # padded to 2 x ranks, then split
    assert states.parameters == (1018 + 50) * 4 and states.optimizer == mine * 12
    assert states.step_transient == mine * 4  # a float32 model's flat gradient is already float32
    offloaded = trained_states(sizes, [], ZeroSettings(3, 4, 2, 100, 50, 10, True, True))
    assert offloaded.optimizer == 0 and offloaded.parameters == (10 + 7) * 2
    assert offloaded.host == (3 + 2 + 251) * (12 + 2 + 4) + (3 + 2 + 251) * 2
    assert frozen_weights(sizes, ZeroSettings(0, 4, 2, 100, 50, 10, False, False)) == 1018 * 2


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


def test_lora_trains_its_adapters_and_saves_dropout_masks():
    config = load_config(None, {"adapter.method": "lora", "adapter.rank": 4, "adapter.target_modules": ["q_proj"]})
    shape = shape_of(tiny_config("llama", 2))
    trained, frozen = trained_and_frozen(config, shape)
    assert trained == [4 * 64, 64 * 4] * 2 and frozen == list(shape.parameter_sizes)
    with_dropout = step_settings(2, lora_rank=4, lora_dropout=0.1, lora_targets=("q_proj",))
    extra = layer_bytes_per_token(shape, with_dropout, 8) - layer_bytes_per_token(shape, step_settings(2), 8)
    assert extra == 2 * 4 * 2 + 64 * 3  # the rank-4 intermediate saved twice; dropout output + mask


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
