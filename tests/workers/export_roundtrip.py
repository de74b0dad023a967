"""Run by 2 ranks: two training steps on a tied-embedding model, then the engine's logits on a
held-out batch, a live export and a checkpoint. usage: export_roundtrip.py MODEL DS_CONFIG OUT [lora]
With lora: LoRA adapters (rank 4), and also the reference's logits (the base, adapters off)."""

import sys
from pathlib import Path

import torch

from plot_ds.training.checkpointing import save_checkpoint
from plot_ds.config import load_config
from plot_ds.data import collate
from plot_ds.training.hf_export import export_hf_model
from plot_ds.training.run import setup_run
from plot_ds.training.loop import train_step


LORA = {"adapter.method": "lora", "adapter.rank": 4, "adapter.target_modules": ["q_proj", "v_proj", "down_proj"]}


def main(model_dir: str, ds_config_path: str, out: str, mode: str = "") -> None:
    out = Path(out)
    config = load_config(
        None,
        {
            **(LORA if mode == "lora" else {}),
            "model.name_or_path": model_dir,
            "deepspeed.config": ds_config_path,
            "data.max_length": 64,
            "data.max_prompt_length": 32,
            "data.eval_size": 2,
            "train.lr": 1e-2,
            "train.output_dir": str(out),
            "train.precision": "fp32",
            "train.micro_batch_size": 2,
            "train.seed": 0,
            "train.resume": "none",
        },
    )
    run = setup_run(config)
    dist, policy, tokenizer, sampler = run.dist, run.policy, run.tokenizer, run.sampler
    for step in range(2):
        train_step(run, run.micro_batches(step))
    batch = collate(run.eval_examples, tokenizer.pad_token_id)
    policy.eval()
    with torch.no_grad():
        logits = policy(
            input_ids=batch.input_ids.to(policy.device), attention_mask=batch.attention_mask.to(policy.device)
        ).logits
        reference = run.reference.engine(
            input_ids=batch.input_ids.to(policy.device), attention_mask=batch.attention_mask.to(policy.device)
        ).logits
    if dist.is_main:
        torch.save(
            {
                "logits": logits.cpu(),
                "input_ids": batch.input_ids,
                "attention_mask": batch.attention_mask,
                "reference_logits": reference.cpu(),
                "trainable": [n for n, p in policy.module.named_parameters() if p.requires_grad],
            },
            out / "engine_logits.pt",
        )
    export_hf_model(policy, tokenizer, out / "live_export", dist.is_main)
    save_checkpoint(policy, out, 2, dist.rank, dist.is_main, sampler.state_dict(2), config)


if __name__ == "__main__":
    main(*sys.argv[1:5])
