"""Hugging Face folders (safetensors weights, config, generation config, tokenizer; tied
embeddings stored once) from a live engine or from a checkpoint on disk, written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import torch

from ..engine.adapters import add_adapters, merged_state, peft_model_of, save_adapter_folder
from ..atomic import atomic_folder
from .checkpointing import COMPLETE_MARKER
from ..engine.deepspeed_patches import merged_fp32_state_dict
from ..distributed.process_group import barrier
from ..errors import CheckpointError
from ..engine.models import load_tokenizer


def export_checkpoint(directory: Path, target: Path) -> Path:
    """A Hugging Face folder from a complete checkpoint, in one process and without DeepSpeed's
    ranks: the fp32 master weights are merged from every rank's partitions (read as plain data)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..assets import resolve_model_path
    from ..config import load_config

    directory = Path(directory)
    if not (directory / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{directory} is not a complete plot_ds checkpoint (no {COMPLETE_MARKER})")
    config = load_config(directory / "config.yaml")
    state = merged_fp32_state_dict(str(directory.parent), tag=directory.name)
    base = resolve_model_path(config.model.name_or_path)
    if config.adapter.active:
        return _export_adapted_checkpoint(directory, config, base, state, Path(target))
    model_config = AutoConfig.from_pretrained(
        base, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
    )
    model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not fit {base}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    with atomic_folder(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        load_tokenizer(config).save_pretrained(staging)
    return Path(target)


def adapter_folder_for(target: Path) -> Path:
    """Where the PEFT folder of an adapter run goes beside its merged model: <target>_adapter."""
    return target.parent / f"{target.name}_adapter"


def _export_adapted_checkpoint(directory: Path, config, base: str, state: dict, target: Path) -> Path:
    """An adapter run's checkpoint holds only what trained (frozen weights are not saved): the base
    is read from its own folder in fp32, the trained tensors put in, then both folders written."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, revision=config.model.revision, dtype=torch.float32, trust_remote_code=config.model.trust_remote_code
    )
    add_adapters(model, config.adapter, torch.float32)
    trained = [name for name, param in model.named_parameters() if param.requires_grad]
    absent = [name for name in trained if name not in state]
    if absent:
        raise CheckpointError(
            f"{directory}: its adapter weights do not fit adapter settings of its config.yaml "
            f"(missing {absent[:5]}); it was written by another adapter configuration"
        )
    model.load_state_dict({name: state[name] for name in trained}, strict=False)
    tokenizer = load_tokenizer(config)
    save_adapter_folder(model, tokenizer, adapter_folder_for(target), is_main=True)
    _save_folder(model, tokenizer, merged_state(model, is_main=True), target)
    return target


def _save_folder(model, tokenizer, state: dict, target: Path) -> None:
    with atomic_folder(target) as staging:
        model.save_pretrained(staging, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staging)


def export_hf_model(engine, tokenizer, target: Path, is_main: bool) -> list[Path]:
    """Gather the ZeRO-3 shards one tensor (or adapted layer) at a time, bounded memory, into a
    Hugging Face folder on rank 0; for an adapter run the adapters are merged into it, and the PEFT
    folder is written beside it (``adapter_folder_for``). Returns the folders written."""
    import deepspeed

    model = engine.module
    written = [Path(target)]
    if peft_model_of(model) is not None:
        save_adapter_folder(model, tokenizer, adapter_folder_for(Path(target)), is_main)
        written.append(adapter_folder_for(Path(target)))
        state = merged_state(model, is_main)
    else:
        state = {}
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_main:
                    state[name] = param.detach().to("cpu", copy=True).contiguous()
    if is_main:
        _save_folder(model, tokenizer, state, Path(target))
    barrier()
    return written
