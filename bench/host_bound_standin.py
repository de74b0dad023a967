"""A host-bound stand-in for a GPU step, buildable on a CPU machine: a Llama with SmolLM2-135M's
30 layers and vocabulary but hidden size 64 (seeded random weights), and short CHAMP pairs (the
first words of each prompt and response). Its layers cost almost nothing to compute, so a step's
time is mostly the trainer's host work per module and per parameter (hooks, optimizer, logging),
which is what bounds a small model's step on a fast GPU (docs/benchmarks.md, the H100 section).

    python bench/host_bound_standin.py /tmp/standin      # writes /tmp/standin/model, /tmp/standin/pairs.jsonl
    python bench/trl_comparison.py --model /tmp/standin/model --pairs /tmp/standin/pairs.jsonl \\
        --max-length 96 --max-prompt-length 48 --steps 10 --warmup 3 [--plot-ds-args "..."]

Not a measure of throughput on any real model: a stand-in for where the host time goes.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
WORDS = {"prompt": 12, "chosen": 15, "rejected": 15}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def build(target: Path, pairs: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from plot_ds.assets import champ_pairs, resolve_model_path

    source = Path(resolve_model_path("builtin:smollm2-135m-instruct"))
    config = AutoConfig.from_pretrained(source)
    for key, value in SHAPE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target / "model", safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / "model" / name)
    with open(target / "pairs.jsonl", "w") as handle:
        for pair in champ_pairs()[:pairs]:
            handle.write(
                json.dumps({field: " ".join(pair[field].split()[:count]) for field, count in WORDS.items()}) + "\n"
            )
    layers, width = config.num_hidden_layers, config.hidden_size
    print(
        f"wrote {target}/model ({layers} layers of width {width}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) and {target}/pairs.jsonl ({pairs} pairs)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("--pairs", type=int, default=40)
    args = parser.parse_args()
    build(args.target, args.pairs)
