"""Training state on disk: atomic checkpoints, exact resume, and the Hugging Face export.

A checkpoint ``checkpoints/step_<N>/`` holds DeepSpeed's engine state (each rank's model and
optimizer partitions, the lr scheduler), every rank's RNG states, the data position and the
config. It counts only once ``plot_ds_complete.json`` is in it: that marker, and then the
``latest_complete`` pointer, are written by rank 0 after every rank has finished writing, so a
checkpoint interrupted while being written is never chosen for resume. Nothing is unpickled:
DeepSpeed's files are read with ``torch.load(weights_only=True)`` (allowing only its two plain
state classes), ours are JSON and safetensors.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from .distributed import barrier

COMPLETE_MARKER = "plot_ds_complete.json"
POINTER = "latest_complete"
TAG_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and why."""


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _write_atomically(path: Path, text: str) -> None:
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(staging, path)


# ------------------------------------------------------------------------------------ RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    import numpy
    from deepspeed.accelerator import get_accelerator

    tensors = {"torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        tensors["accelerator"] = accelerator.get_rng_state()
    kind, keys, pos, has_gauss, cached = numpy.random.get_state()
    plain = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    import numpy
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(tensors["torch"])
    if "accelerator" in tensors and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(tensors["accelerator"])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------ save
def save_checkpoint(engine, output_dir: Path, step: int, rank: int, is_main: bool,
                    data_state: dict | None = None, config=None, keep_last: int = 0) -> Path:
    """Every rank writes its partitions and RNG states; rank 0 then marks the checkpoint complete,
    moves the pointer and prunes old checkpoints (keeping ``keep_last``; 0 keeps all)."""
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    directory = root / tag
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "data": data_state or {}},
                           save_latest=False)
    tensors, plain = rng_state()
    save_file(tensors, str(directory / f"rng_rank{rank}.safetensors"))
    (directory / f"rng_rank{rank}.json").write_text(json.dumps(plain))
    barrier()  # every rank's files are on disk
    if is_main:
        if config is not None:
            config.save(directory / "config.yaml")
        _mark_complete(directory, {"step": step, "world_size": _world_size(), "time": time.time(),
                                   "data": data_state or {}})
        _write_atomically(root / POINTER, tag)
        if keep_last:
            _prune(root, keep_last)
    barrier()
    return directory


def _world_size() -> int:
    import deepspeed.comm as dist
    return dist.get_world_size() if dist.is_initialized() else 1


def _mark_complete(directory: Path, info: dict) -> None:
    _write_atomically(directory / COMPLETE_MARKER, json.dumps(info))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
             and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def _prune(root: Path, keep_last: int) -> None:
    complete = complete_checkpoints(root)
    keep = set(complete[-keep_last:])
    newest = complete[-1].name if complete else ""
    for path in root.iterdir():
        if not (path.is_dir() and path.name.startswith(TAG_PREFIX)) or path in keep:
            continue
        # Incomplete ones newer than the newest complete one may still be being written.
        if (path / COMPLETE_MARKER).is_file() or path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(resume: str, output_dir: Path) -> Path | None:
    """``resume``: "auto" (the newest complete checkpoint of this run, if any), "none", or a path
    (a checkpoint directory, or a run's checkpoints folder)."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(output_dir)
        pointer = root / POINTER
        if pointer.is_file():
            chosen = root / pointer.read_text().strip()
            if (chosen / COMPLETE_MARKER).is_file():
                return chosen
        complete = complete_checkpoints(root)
        return complete[-1] if complete else None
    path = Path(resume)
    if (path / COMPLETE_MARKER).is_file():
        return path
    complete = complete_checkpoints(path) or complete_checkpoints(checkpoint_root(path))
    if not complete:
        raise CheckpointError(f"train.resume: {path} holds no complete plot_ds checkpoint "
                              f"(a step_<N> folder with {COMPLETE_MARKER})")
    return complete[-1]


# ------------------------------------------------------------------------------------ load
def _deepspeed_state_classes() -> list:
    """The only non-builtin types in DeepSpeed's files: plain state holders, safe to allow."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 with 16-bit weights: two ints

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_as_data(path, map_location=None, **kwargs):
    """``torch.load`` as plain data (weights_only=True), whatever the caller asked for."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except Exception as err:
        raise CheckpointError(f"{path}: not loadable as plain data (weights_only=True): {err}") from None


_TORCH_LOAD = torch.load


def checkpoint_ds_config(directory: Path) -> str | None:
    """The DeepSpeed JSON a checkpoint was written with (its config.yaml), which fixes the layout of
    its optimizer state; None where the checkpoint does not say."""
    saved = directory / "config.yaml"
    if not saved.is_file():
        return None
    written = (yaml.safe_load(saved.read_text()) or {}).get("deepspeed", {}).get("config")
    return written if written and written != "auto" else None


def _safe_deepspeed_load(checkpoint_engine) -> None:
    """DeepSpeed unpickles its files (weights_only=False); read them as data only."""
    checkpoint_engine.load = types.MethodType(lambda self, path, map_location=None: load_as_data(path, map_location),
                                              checkpoint_engine)


def load_checkpoint(engine, directory: Path, rank: int) -> dict:
    """Restore engine state (model, optimizer, scheduler) and this rank's RNG states; returns the
    completion info (step, data position, world size)."""
    from safetensors.torch import load_file

    info = json.loads((directory / COMPLETE_MARKER).read_text())
    source = directory
    if info["world_size"] != _world_size():
        # ZeRO partitions are per rank: reshard through DeepSpeed's universal checkpoint format.
        source = universal_checkpoint(directory, is_main=rank == 0)
        engine._config.load_universal_checkpoint = True
    _safe_deepspeed_load(engine.checkpoint_engine)
    with _torch_load_as_data():  # DeepSpeed's universal loader calls torch.load directly
        loaded, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"{directory}: DeepSpeed could not load it")
    rng_file = directory / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)), json.loads((directory / f"rng_rank{rank}.json").read_text()))
    else:  # a rank the checkpoint did not have: a fresh stream, derived from rank 0's
        set_rng_state(load_file(str(directory / "rng_rank0.safetensors")),
                      json.loads((directory / "rng_rank0.json").read_text()))
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()) + rank)
    return info


@contextmanager
def _torch_load_as_data():
    original, torch.load = torch.load, load_as_data
    try:
        yield
    finally:
        torch.load = original


def universal_checkpoint(directory: Path, is_main: bool) -> Path:
    """``<checkpoint>.universal``: the checkpoint in DeepSpeed's rank-independent format, converted
    once (by rank 0, files read as plain data) for resuming with another number of ranks."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    target = directory.parent / f"{directory.name}.universal" / directory.name
    if is_main and not (target.parent / COMPLETE_MARKER).is_file():
        shutil.rmtree(target.parent, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(directory), output_folder=str(target), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False)
        with _torch_load_as_data():
            ds_to_universal.main(args)
        _mark_complete(target.parent, {"converted_from": str(directory)})
    barrier()
    return target


# ------------------------------------------------------------------------------------ export
def export_checkpoint(directory: Path, target: Path) -> Path:
    """A Hugging Face folder from a complete checkpoint, in one process and without DeepSpeed's
    ranks: the fp32 master weights are merged from every rank's partitions (read as plain data)."""
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32
    from transformers import AutoConfig, AutoModelForCausalLM

    from .assets import resolve_model_path
    from .config import load_config
    from .engine import load_tokenizer

    directory = Path(directory)
    if not (directory / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{directory} is not a complete plot_ds checkpoint (no {COMPLETE_MARKER})")
    config = load_config(directory / "config.yaml")
    original, zero_to_fp32.torch.load = zero_to_fp32.torch.load, load_as_data
    try:
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)
    finally:
        zero_to_fp32.torch.load = original
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
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent if target.parent.exists() else None))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        load_tokenizer(config).save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

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
