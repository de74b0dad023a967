"""Training state on disk: atomic checkpoints and exact resume.

A checkpoint ``checkpoints/step_<N>/`` holds DeepSpeed's engine state (each rank's model and
optimizer partitions, the lr scheduler), every rank's RNG states, the data position and the
config. It counts only once ``plot_ds_complete.json`` is in it: that marker, and then the
``latest_complete`` pointer, are written by rank 0 after every rank has finished writing, so a
checkpoint interrupted while being written is never chosen for resume. Nothing is unpickled:
DeepSpeed's files are read with ``torch.load(weights_only=True)``
(``deepspeed_patches.reading_checkpoints_as_data``), ours are JSON and safetensors.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .atomic import write_text_atomically
from .deepspeed_patches import convert_to_universal, load_universal_next, reading_checkpoints_as_data
from .distributed import barrier, world_size
from .errors import CheckpointError
from .rng import rng_state, set_rng_state

__all__ = ["CheckpointError", "COMPLETE_MARKER", "complete_checkpoints", "find_checkpoint", "load_checkpoint",
           "save_checkpoint"]

COMPLETE_MARKER = "plot_ds_complete.json"
POINTER = "latest_complete"
TAG_PREFIX = "step_"


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


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
        _mark_complete(directory, {"step": step, "world_size": world_size(), "time": time.time(),
                                   "data": data_state or {}})
        write_text_atomically(root / POINTER, tag)
        if keep_last:
            _prune(root, keep_last)
    barrier()
    return directory


def _mark_complete(directory: Path, info: dict) -> None:
    write_text_atomically(directory / COMPLETE_MARKER, json.dumps(info))


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
def load_checkpoint(engine, directory: Path, rank: int) -> dict:
    """Restore engine state (model, optimizer, scheduler) and this rank's RNG states; returns the
    completion info (step, data position, world size)."""
    from safetensors.torch import load_file

    info = json.loads((directory / COMPLETE_MARKER).read_text())
    source = directory
    if info["world_size"] != world_size():
        # ZeRO partitions are per rank: reshard through DeepSpeed's universal checkpoint format.
        source = universal_checkpoint(directory, is_main=rank == 0)
        load_universal_next(engine)
    with reading_checkpoints_as_data(engine):
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


def universal_checkpoint(directory: Path, is_main: bool) -> Path:
    """``<checkpoint>.universal``: the checkpoint in DeepSpeed's rank-independent format, converted
    once (by rank 0, files read as plain data) for resuming with another number of ranks."""
    target = directory.parent / f"{directory.name}.universal" / directory.name
    if is_main and not (target.parent / COMPLETE_MARKER).is_file():
        shutil.rmtree(target.parent, ignore_errors=True)
        convert_to_universal(str(directory), str(target))
        _mark_complete(target.parent, {"converted_from": str(directory)})
    barrier()
    return target
