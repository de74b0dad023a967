"""Assets for bench/gpu_check.sh on a lent GPU machine that reaches no network and takes at most
64 MiB of files: the SmolLM2-135M config and tokenizer (a few MB) and the CHAMP pairs as JSONL,
packed here; there, a model of exactly SmolLM2-135M's shapes is rebuilt with seeded random weights
(the 500 MB of real weights cannot travel; speed and memory depend on the shapes, not the values).

    python bench/gpu_assets.py pack .gpu/assets          # here, on the CPU machine
    python bench/gpu_assets.py unpack .gpu/assets /tmp/smollm2-shaped   # there
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def pack(target: Path) -> None:
    from plot_ds.assets import champ_pairs, resolve_model_path

    model = Path(resolve_model_path("builtin:smollm2-135m-instruct"))
    (target / "model").mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (model / name).exists():
            shutil.copy2(model / name, target / "model" / name)
    with open(target / "champ.jsonl", "w") as handle:
        for pair in champ_pairs():
            handle.write(json.dumps(pair) + "\n")
    print(f"packed {target}: model config + tokenizer, {sum(1 for _ in open(target / 'champ.jsonl'))} pairs")


# SmolLM2's family, vocabulary and tokenizer at a few layers of a small width: GPU_CHECK_SHAPE=tiny
# makes gpu_check.sh a smoke test of its own sections on a CPU (tests/test_bench.py), where the
# real shapes' minutes of compute would check nothing more.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def unpack(source: Path, target: Path, shape: str = "real") -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (target / "model.safetensors").exists():
        return
    config = AutoConfig.from_pretrained(source / "model", **(TINY if shape == "tiny" else {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    staging = target.with_name(target.name + ".staging")
    model.save_pretrained(staging, safe_serialization=True)
    for name in MODEL_FILES:
        if name != "config.json" and (source / "model" / name).exists():  # the config is the model's own
            shutil.copy2(source / "model" / name, staging / name)
    staging.rename(target)
    print(f"built {target}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random weights")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("paths", nargs="+")
    parser.add_argument(
        "--shape",
        choices=("real", "tiny"),
        default="real",
        help="tiny: a few narrow layers of SmolLM2's family and vocabulary (a CPU smoke test)",
    )
    args = parser.parse_args()
    if args.action == "pack":
        pack(Path(args.paths[0]))
    else:
        unpack(Path(args.paths[0]), Path(args.paths[1]), args.shape)
