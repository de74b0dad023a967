"""LoRA adapters (plot_ds/engine/adapters.py): settings and their errors, the merged weights, and a 2-rank
ZeRO-3 run whose reference is its base with the adapters off and whose exports reload."""

import json
import sys

import pytest
import torch

from conftest import REPO, WORKERS, run_command, torchrun
from plot_ds.engine.adapters import add_adapters, merged_state, quantization_config
from plot_ds.config import AdapterConfig, ConfigError, load_config
from plot_ds.errors import ModelError


def test_adapter_settings_from_yaml_lists_and_dotted_overrides():
    config = load_config(
        None,
        {"adapter.method": "lora", "adapter.target_modules": "q_proj, v_proj", "adapter.modules_to_save": ["lm_head"]},
    )
    assert config.adapter.target_modules == ["q_proj", "v_proj"] and config.adapter.modules_to_save == ["lm_head"]
    assert load_config(None, {"adapter.method": "lora"}).adapter.target_modules == "all-linear"


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"adapter.method": "lora", "adapter.rank": 0}, "adapter.rank: must be >= 1"),
        ({"adapter.method": "lora", "adapter.dropout": 1.0}, "adapter.dropout"),
        ({"adapter.method": "lora", "adapter.target_modules": []}, "adapter.target_modules: empty"),
        ({"adapter.quantize": "4bit"}, "set adapter.method lora"),
        ({"adapter.method": "lora", "reference.offload": True}, "reference.offload: with adapter.method lora"),
        ({"adapter.method": "lora", "deepspeed.zero3_leaf_modules": "LlamaDecoderLayer"}, "use auto or none"),
        ({"adapter.method": "qlora"}, "adapter.method: 'qlora' is not one of"),
    ],
)
def test_bad_adapter_settings_are_refused_with_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides)


def test_quantized_base_needs_cuda_and_names_the_way_out():
    settings = AdapterConfig(method="lora", quantize="4bit")
    with pytest.raises(ModelError, match="need a CUDA device.*this run's accelerator is cpu.*adapter.quantize none"):
        quantization_config(settings, torch.float32, "cpu", zero_stage=3)
    assert quantization_config(AdapterConfig(method="lora"), torch.float32, "cpu", 3) is None


def tiny_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_unknown_target_modules_and_modules_to_save_under_zero3(tiny_model_dir):
    with pytest.raises(ModelError, match="no linear layer named qkv_proj; its linear layers are .*q_proj"):
        add_adapters(
            tiny_model(tiny_model_dir), AdapterConfig(method="lora", target_modules=["qkv_proj"]), torch.float32
        )
    with pytest.raises(ModelError, match="ZeRO-3 cannot partition peft's trained copies.*zero2.json"):
        add_adapters(
            tiny_model(tiny_model_dir),
            AdapterConfig(method="lora", modules_to_save=["lm_head"]),
            torch.float32,
            zero_stage=3,
        )


def test_only_adapters_train_and_the_merged_weights_are_peft_merge(tiny_model_dir):
    model = add_adapters(tiny_model(tiny_model_dir), AdapterConfig(method="lora", rank=4), torch.float32)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # all-linear: attention and MLP projections, not the LM head
    assert {n.split(".")[-4] for n in trainable} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    ids = torch.randint(0, 49152, (2, 9), generator=generator)
    model.eval()  # peft's new dropout modules start in training mode
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    state = merged_state(model, is_main=True)
    plain = tiny_model(tiny_model_dir)
    assert set(state) == {n for n, _ in plain.named_parameters()}
    plain.load_state_dict(state, strict=False)
    with torch.no_grad():
        merged = plain(input_ids=ids).logits
        base = tiny_model(tiny_model_dir)(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-2


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, zero3_test_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    out.mkdir()
    torchrun(2, WORKERS / "export_roundtrip.py", tiny_model_dir, zero3_test_config, out, "lora", output=out)
    return out


@pytest.mark.distributed
def test_reference_is_the_base_with_adapters_off(lora_run, tiny_model_dir):
    engine = torch.load(lora_run / "engine_logits.pt", weights_only=True)
    assert all(".lora_" in name for name in engine["trainable"])
    with torch.no_grad():
        base = tiny_model(tiny_model_dir)(input_ids=engine["input_ids"], attention_mask=engine["attention_mask"]).logits
    torch.testing.assert_close(engine["reference_logits"], base, rtol=1e-5, atol=1e-5)
    assert (engine["logits"] - base).abs().max() > 1e-3  # the adapters trained


@pytest.mark.distributed
def test_merged_and_peft_exports_live_and_from_the_checkpoint_give_the_trained_model(
    lora_run, tiny_model_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported = run_command(
        [
            sys.executable,
            "-c",
            "import sys; from plot_ds.cli import export_main; sys.exit(export_main())",
            str(lora_run),
            "--output",
            str(tmp_path / "offline"),
        ],
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    assert "its adapter (PEFT) to" in exported.stdout
    checkpoint = lora_run / "checkpoints" / "step_00000002"
    saved = sum(p.stat().st_size for p in checkpoint.rglob("*.pt"))
    base_bytes = (REPO / tiny_model_dir / "model.safetensors").stat().st_size
    assert saved < base_bytes / 4, "the frozen base was written into the checkpoint"
    engine = torch.load(lora_run / "engine_logits.pt", weights_only=True)
    inputs = {"input_ids": engine["input_ids"], "attention_mask": engine["attention_mask"]}
    for merged in (lora_run / "live_export", tmp_path / "offline"):
        adapter = merged.parent / f"{merged.name}_adapter"
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        with torch.no_grad():
            merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(**inputs).logits
            peft_logits = PeftModel.from_pretrained(tiny_model(tiny_model_dir), adapter)(**inputs).logits
        torch.testing.assert_close(merged_logits, engine["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peft_logits, engine["logits"], rtol=1e-5, atol=1e-5)


def test_cached_reference_of_a_lora_run_is_its_base(tiny_model_dir, data_file, tmp_path):
    """reference.mode cache with adapters: the log-probs come from the base with the adapters off
    (no reference engine), and the run trains as with the reference computed every step."""
    args = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--model.name_or_path",
        tiny_model_dir,
        "--adapter.method",
        "lora",
        "--adapter.rank",
        "4",
        "--adapter.dropout",
        "0.0",
        "--data.source",
        str(data_file),
        "--data.max_length",
        "64",
        "--data.max_prompt_length",
        "32",
        "--data.eval_size",
        "2",
        "--train.max_steps",
        "2",
        "--train.lr",
        "1e-2",
        "--train.precision",
        "fp32",
        "--train.save_checkpoint",
        "false",
        "--train.export_final",
        "false",
        "--eval.generations",
        "0",
        "--eval.answer_samples",
        "0",
    ]
    histories = {}
    for mode in ("engine", "cache"):
        out = tmp_path / mode
        proc = run_command(
            [
                *args,
                "--reference.mode",
                mode,
                "--reference.cache_path",
                str(tmp_path / "ref.safetensors"),
                "--train.output_dir",
                str(out),
            ]
        )
        assert ("computing reference log-probs once" in proc.stdout) == (mode == "cache")
        histories[mode] = json.loads((out / "train_history.json").read_text())
    for engine_step, cache_step in zip(histories["engine"], histories["cache"], strict=True):
        for name in ("loss/total", "rewards/margins", "loss/plot"):
            assert cache_step[name] == pytest.approx(engine_step[name], rel=1e-5, abs=1e-7), name
    assert histories["cache"][-1]["rewards/margins"] != 0  # the adapters moved away from the base
