"""Run by 2 ranks: two training steps on a tied-embedding model, then the engine's logits on a
held-out batch, a live export and a checkpoint. usage: export_roundtrip.py MODEL DS_CONFIG OUT"""
import sys
from pathlib import Path

import torch

from plot_ds.checkpointing import export_hf_model, save_checkpoint
from plot_ds.config import load_config
from plot_ds.data import GlobalBatchSampler, collate, prepare_datasets
from plot_ds.distributed import barrier, init_distributed
from plot_ds.embedding_slice import embedding_rows_for
from plot_ds.engine import build_policy_engine, build_reference_engine, load_ds_config, load_tokenizer
from plot_ds.objectives import build_objective
from plot_ds.training import train_step


def main(model_dir: str, ds_config_path: str, out: str) -> None:
    out = Path(out)
    dist = init_distributed()
    config = load_config(None, {"model.name_or_path": model_dir, "deepspeed.config": ds_config_path,
                                "data.max_length": 64, "data.max_prompt_length": 32, "data.eval_size": 2,
                                "train.lr": 1e-2, "train.output_dir": str(out), "train.precision": "fp32"})
    ds_config = load_ds_config(config, dist.world_size)
    tokenizer = load_tokenizer(config)
    examples, held_out, _ = prepare_datasets(config.data, tokenizer, preparer=dist.local_rank == 0, sync=barrier)
    sampler = GlobalBatchSampler(len(examples), 2, 1, dist.rank, dist.world_size, seed=0)
    policy = build_policy_engine(config, ds_config)
    objective = build_objective(config, embedding_rows_for(policy.module, config.plot))
    reference = build_reference_engine(config, ds_config)
    for step in range(2):
        batches = [collate([examples[i] for i in idx], tokenizer.pad_token_id, examples[0])
                   for idx in sampler.micro_batches(step)]
        train_step(policy, reference, objective, batches, dist.world_size)
    batch = collate(held_out, tokenizer.pad_token_id)
    policy.eval()
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"].to(policy.device),
                        attention_mask=batch["attention_mask"].to(policy.device)).logits
    if dist.is_main:
        torch.save({"logits": logits.cpu(), "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                   out / "engine_logits.pt")
    export_hf_model(policy, tokenizer, out / "live_export", dist.is_main)
    save_checkpoint(policy, out, 2, dist.rank, dist.is_main, sampler.state_dict(2), config)


if __name__ == "__main__":
    main(*sys.argv[1:4])
