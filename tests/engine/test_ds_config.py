import json

import pytest

from conftest import REPO
from plot_ds.config import ConfigError, TrainConfig, load_config, parse_overrides
from plot_ds.engine.ds_config import (
    choose_ds_config,
    fill_ds_config,
    find_ds_config,
    load_ds_config,
    reference_ds_config,
)


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_shipped_configs_fill_every_auto_field(name):
    config = load_config(
        None,
        parse_overrides(
            [
                "--deepspeed.config",
                f"ds_configs/{name}",
                "--train.micro_batch_size",
                "3",
                "--train.gradient_accumulation_steps",
                "5",
                "--train.max_grad_norm",
                "0.5",
                "--train.lr",
                "2e-6",
                "--train.precision",
                "bf16",
            ]
        ),
    )
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
    assert (
        fill_ds_config(template, TrainConfig(), 1, hidden_size=576)["zero_optimization"]["reduce_bucket_size"] == 1000
    )


def test_unknown_auto_field_is_refused():
    template = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}  # no model to size it from
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size"):
        fill_ds_config(template, TrainConfig(), 1)


def test_missing_ds_config_names_the_file():
    with pytest.raises(ConfigError, match="deepspeed.config: nope.json not found"):
        find_ds_config("nope.json")


@pytest.mark.parametrize(
    "precision, ranks, stage", [("bf16", 1, 2), ("fp16", 1, 2), ("fp32", 1, 3), ("bf16", 2, 3), ("fp32", 2, 3)]
)
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
