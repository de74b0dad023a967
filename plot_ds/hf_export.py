"""Hugging Face folders (safetensors weights, config, generation config, tokenizer; tied
embeddings stored once) from a live engine or from a checkpoint on disk, written whole or not at all."""
from __future__ import annotations

from pathlib import Path

import torch

from .atomic import atomic_folder
from .checkpointing import COMPLETE_MARKER
from .deepspeed_patches import merged_fp32_state_dict
from .distributed import barrier
from .errors import CheckpointError
from .models import load_tokenizer


def export_checkpoint(directory: Path, target: Path) -> Path:
    """A Hugging Face folder from a complete checkpoint, in one process and without DeepSpeed's
    ranks: the fp32 master weights are merged from every rank's partitions (read as plain data)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .assets import resolve_model_path
    from .config import load_config

    directory = Path(directory)
    if not (directory / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{directory} is not a complete plot_ds checkpoint (no {COMPLETE_MARKER})")
    config = load_config(directory / "config.yaml")
    state = merged_fp32_state_dict(str(directory.parent), tag=directory.name)
    base = resolve_model_path(config.model.name_or_path)
    model_config = AutoConfig.from_pretrained(base, revision=config.model.revision,
                                              trust_remote_code=config.model.trust_remote_code)
    model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not fit {base}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.tie_weights()
    with atomic_folder(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        load_tokenizer(config).save_pretrained(staging)
    return Path(target)


def export_hf_model(engine, tokenizer, target: Path, is_main: bool) -> Path:
    """Gather the ZeRO-3 shards one tensor at a time (bounded memory) into a Hugging Face folder on
    rank 0."""
    import deepspeed

    model = engine.module
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_main:
                state[name] = param.detach().to("cpu", copy=True).contiguous()
    if is_main:
        with atomic_folder(target) as staging:
            model.save_pretrained(staging, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(staging)
    barrier()
    return Path(target)
