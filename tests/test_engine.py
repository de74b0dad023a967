import json

import pytest

from conftest import REPO
from plot_ds.config import ConfigError, TrainConfig, load_config, parse_overrides
from plot_ds.engine import (choose_ds_config, fill_ds_config, find_ds_config, load_ds_config,
                            mark_zero3_leaf_modules, reference_ds_config, shares_prompt, warmup_cosine)


def tiny_llama(layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1))


def leaf_counts(model):
    from deepspeed.utils import z3_leaf_module

    return {type(m).__name__: sum(1 for n in model.modules() if type(n) is type(m) and z3_leaf_module(n))
            for m in model.modules() if z3_leaf_module(m)}


@pytest.mark.parametrize("setting, expected", [
    ("auto", {"LlamaDecoderLayer": 3}),          # the model's own _no_split_modules
    ("LlamaMLP,LlamaAttention", {"LlamaMLP": 3, "LlamaAttention": 3}),
    ("none", {}),
])
def test_zero3_leaf_modules_mark_whole_layers(setting, expected):
    model = tiny_llama()
    config = load_config(None, {"deepspeed.zero3_leaf_modules": setting})
    marked = mark_zero3_leaf_modules(model, config.deepspeed)
    assert sorted(marked) == sorted(expected) and leaf_counts(model) == expected


def test_zero3_leaf_module_that_is_not_in_the_model_is_refused_with_the_choices():
    config = load_config(None, {"deepspeed.zero3_leaf_modules": "Qwen2DecoderLayer"})
    with pytest.raises(ConfigError, match="no module of class Qwen2DecoderLayer in LlamaForCausalLM; its module "
                                          "classes are .*LlamaDecoderLayer"):
        mark_zero3_leaf_modules(tiny_llama(), config.deepspeed)


def test_zero3_leaf_modules_auto_warns_for_a_model_that_names_no_layer():
    model = tiny_llama()
    model._no_split_modules = None
    with pytest.warns(UserWarning, match="names no decoder layer class"):
        assert mark_zero3_leaf_modules(model, load_config(None, {}).deepspeed) == []
    assert leaf_counts(model) == {}


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_shipped_configs_fill_every_auto_field(name):
    config = load_config(None, parse_overrides([
        "--deepspeed.config", f"ds_configs/{name}", "--train.micro_batch_size", "3",
        "--train.gradient_accumulation_steps", "5", "--train.max_grad_norm", "0.5",
        "--train.lr", "2e-6", "--train.precision", "bf16"]))
    ds = load_ds_config(config, world_size=4)
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == 2e-6
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no C++ op build on first use


def test_written_values_must_agree_with_the_training_config():
    template = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    template["train_micro_batch_size_per_gpu"] = 8
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 8 in the DeepSpeed config"):
        fill_ds_config(template, TrainConfig(micro_batch_size=2), world_size=1)
    template["train_micro_batch_size_per_gpu"] = 2
    filled = fill_ds_config(template, TrainConfig(micro_batch_size=2), 1, hidden_size=576)
    assert filled["train_micro_batch_size_per_gpu"] == 2


def test_zero_buffers_are_sized_from_the_model():
    template = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    zero = fill_ds_config(template, TrainConfig(), 1, hidden_size=576)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 576 * 576
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 576 * 576)
    assert zero["stage3_param_persistence_threshold"] == 5760
    template["zero_optimization"]["reduce_bucket_size"] = 1000  # a written value stays
    assert fill_ds_config(template, TrainConfig(), 1, hidden_size=576)["zero_optimization"]["reduce_bucket_size"] == 1000


def test_unknown_auto_field_is_refused():
    template = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}  # no model to size it from
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size"):
        fill_ds_config(template, TrainConfig(), 1)


def test_missing_ds_config_names_the_file():
    with pytest.raises(ConfigError, match="deepspeed.config: nope.json not found"):
        find_ds_config("nope.json")


@pytest.mark.parametrize("precision, ranks, stage", [("bf16", 1, 2), ("fp16", 1, 2), ("fp32", 1, 3),
                                                     ("bf16", 2, 3), ("fp32", 2, 3)])
def test_auto_config_is_zero2_only_on_one_rank_with_16_bit_weights(precision, ranks, stage):
    config = load_config(None, {"train.precision": precision})
    assert config.deepspeed.config == "auto"
    assert load_ds_config(config, world_size=ranks)["zero_optimization"]["stage"] == stage
    assert choose_ds_config(config, ranks, None) == f"ds_configs/zero{stage}.json"
    named = load_config(None, {"train.precision": precision, "deepspeed.config": "ds_configs/zero3.json"})
    assert choose_ds_config(named, ranks, None) == "ds_configs/zero3.json"
    assert load_ds_config(named, world_size=ranks)["zero_optimization"]["stage"] == 3


def test_auto_config_resumes_with_the_checkpoints_own(tmp_path):
    """A ZeRO-3 checkpoint of a 2-rank run resumed on one rank stays ZeRO-3: its optimizer state is
    laid out per ZeRO-3 partition (and the universal conversion reshards it)."""
    checkpoint = tmp_path / "step_00000004"
    checkpoint.mkdir()
    bf16 = load_config(None, {"train.precision": "bf16"})
    assert choose_ds_config(bf16, 1, checkpoint) == "ds_configs/zero2.json"  # the checkpoint does not say
    load_config(None, {"deepspeed.config": "ds_configs/zero3.json"}).save(checkpoint / "config.yaml")
    assert choose_ds_config(bf16, 1, checkpoint) == "ds_configs/zero3.json"
    named = load_config(None, {"train.precision": "bf16", "deepspeed.config": "ds_configs/zero3_offload.json"})
    assert choose_ds_config(named, 1, checkpoint) == "ds_configs/zero3_offload.json"  # the user's word wins


@pytest.mark.parametrize("setting, ds_file, ranks, shared", [
    ("auto", "zero2.json", 1, True), ("auto", "zero2.json", 4, True),
    ("auto", "zero3.json", 1, True),   # one rank: ZeRO-3's gathers are local copies
    ("auto", "zero3.json", 2, False),  # each pass would all-gather and reduce-scatter again
    (True, "zero3.json", 2, True), (False, "zero2.json", 1, False)])
def test_prompt_sharing_auto_is_off_where_zero3_fetches_the_weights_per_pass(monkeypatch, setting, ds_file,
                                                                            ranks, shared):
    import deepspeed.comm

    monkeypatch.setattr(deepspeed.comm, "is_initialized", lambda: True)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *_, **__: ranks)
    config = load_config(None, {"model.share_prompt": setting, "deepspeed.config": f"ds_configs/{ds_file}"})
    ds = load_ds_config(config, world_size=ranks)
    assert shares_prompt(config, ds) is shared
    assert shares_prompt(config, reference_ds_config(ds, offload=False)) is shared
    if ds_file == "zero3.json":  # a reference offloaded to host memory: each pass would fetch it again
        assert shares_prompt(config, reference_ds_config(ds, offload=True)) is (setting is True)


def test_reference_config_shards_like_the_policy_without_optimizer():
    config = load_config(None, parse_overrides(["--train.precision", "fp32"]))
    ds = load_ds_config(config, world_size=2)
    ref = reference_ds_config(ds, offload=True)
    assert "optimizer" not in ref
    assert ref["zero_optimization"]["stage"] == 3
    assert ref["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ref["train_batch_size"] == ds["train_batch_size"]
    zero2 = load_ds_config(load_config(None, {"deepspeed.config": "ds_configs/zero2.json"}), 1)
    assert reference_ds_config(zero2, offload=False)["zero_optimization"]["stage"] == 0
    with pytest.raises(ConfigError, match="reference.offload needs ZeRO-3"):
        reference_ds_config(zero2, offload=True)


def test_warmup_then_cosine_to_the_floor():
    factor = warmup_cosine(TrainConfig(max_steps=10, warmup_steps=2, min_lr_ratio=0.1))
    values = [factor(s) for s in range(11)]
    assert values[0] == pytest.approx(1 / 3) and values[1] == pytest.approx(2 / 3)
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))
    assert values[10] == pytest.approx(0.1)


def test_trim_host_heap_returns_freed_fragmented_blocks_to_the_os():
    """Freed blocks pinned between live ones stay resident until trimmed (glibc), as ZeRO-3's
    freed gathers and gradients do between a step's activations."""
    import os
    import sys

    from plot_ds.engine import trim_host_heap

    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    assert sys.platform.startswith("linux")
    freed, pinned = [], []
    for _ in range(2000):  # 100 kB: below glibc's mmap threshold, so from the heap
        freed.append(bytearray(100_000))
        pinned.append(bytearray(2_000))
    del freed
    held = resident()
    trim_host_heap()
    assert held - resident() > 100 * 2**20  # most of the 200 MB freed


DESTROY_AND_CHECK = """
import gc, sys, weakref
import torch
from plot_ds.config import load_config
from plot_ds.distributed import init_distributed
from plot_ds.engine import build_reference_engine, destroy_engine, load_ds_config, release_freed_memory
config = load_config(None, {"model.name_or_path": sys.argv[1], "deepspeed.config": sys.argv[2]})
init_distributed()
ds_config = load_ds_config(config, 1)

def pass_with_engine(destroy):
    engine = build_reference_engine(config, ds_config)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        for _ in range(2):  # the second pass runs on the recorded trace, with the cached release plans
            engine(input_ids=ids, attention_mask=torch.ones_like(ids))
    model, weight = weakref.ref(engine.module), weakref.ref(engine.module.get_input_embeddings().weight)
    destroy(engine)
    return model, weight

plain = pass_with_engine(lambda engine: engine.destroy())
release_freed_memory()
ours = pass_with_engine(destroy_engine)
release_freed_memory()
print("ALIVE", " ".join(str(ref() is not None) for ref in (*plain, *ours)))
"""


def test_destroyed_zero3_engine_lets_its_model_go(tiny_model_dir, zero3_test_config):
    """DeepSpeed 0.19's engine.destroy() leaves the model on ZeRO-3's module stack and its coordinator
    (with every parameter) in a method cache, alive for the whole run; destroy_engine frees both, as
    the reference cache pass needs."""
    import sys

    from conftest import run_command

    proc = run_command([sys.executable, "-c", DESTROY_AND_CHECK, tiny_model_dir, zero3_test_config],
                       timeout=300, MASTER_ADDR="127.0.0.1")
    plain_model, plain_weight, model, weight = proc.stdout.split("ALIVE")[-1].split()[:4]
    assert (model, weight) == ("False", "False"), f"outlived destroy_engine: model {model}, weights {weight}"
    assert plain_weight == "True"  # DeepSpeed's destroy() alone keeps them: what this guards against
