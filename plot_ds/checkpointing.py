"""Saving training state (DeepSpeed engine state: partitioned model and optimizer) and exporting
the model as a consolidated Hugging Face folder (safetensors)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .distributed import barrier


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(engine, output_dir: Path, step: int) -> Path:
    """Every rank writes its own partition; DeepSpeed moves the ``latest`` pointer afterwards."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    return root / tag


def export_hf_model(engine, tokenizer, target: Path, is_main: bool) -> Path:
    """Gather the ZeRO-3 shards one tensor at a time (bounded memory) into a Hugging Face folder on
    rank 0: safetensors weights (tied embeddings stored once), config, generation config and
    tokenizer. Written to a temporary folder, then renamed: never half-written."""
    import deepspeed

    model = engine.module
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_main:
                state[name] = param.detach().to("cpu", copy=True).contiguous()
    target = Path(target)
    if is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.save_pretrained(staging, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    barrier()
    return target
