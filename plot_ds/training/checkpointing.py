"""Training state on disk: atomic checkpoints and exact resume.

A checkpoint ``checkpoints/step_<N>/`` holds DeepSpeed's engine state (each rank's model and
optimizer partitions, the lr scheduler), every rank's RNG states, the data position and the
config. It counts only once ``plot_ds_complete.json`` is in it: that marker, and then the
``latest_complete`` pointer, are written by rank 0 after every rank has finished writing, so a
checkpoint interrupted while being written is never chosen for resume. The marker lists every
file's size and SHA-256 (each rank hashes a stripe of the files), so a checkpoint damaged after it
was completed (a truncated or altered file) is recognised: ``train.resume: auto`` says which file
and resumes from the newest one that verifies; an explicit path that fails is an error. A write
that fails (full disk, permission, quota) removes its partial directory and leaves the previous
checkpoint the newest complete one (``WriteError``, exit status 4). Nothing is unpickled:
DeepSpeed's files are read with ``torch.load(weights_only=True)``
(``deepspeed_patches.reading_checkpoints_as_data``), ours are JSON and safetensors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from ..engine.adapters import peft_model_of
from ..atomic import write_text_atomically
from ..engine.deepspeed_patches import convert_to_universal, load_universal_next, reading_checkpoints_as_data
from ..distributed.process_group import barrier, on_every_rank, rank as current_rank, world_size
from ..errors import CheckpointError, WriteError
from .rng import rng_state, set_rng_state

__all__ = [
    "CheckpointError",
    "COMPLETE_MARKER",
    "complete_checkpoints",
    "find_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

COMPLETE_MARKER = "plot_ds_complete.json"
POINTER = "latest_complete"
TAG_PREFIX = "step_"
MANIFEST_PREFIX = "plot_ds_manifest_rank"
# What a full disk, a quota or a lost mount looks like from torch's zip writer (not an OSError).
WRITE_FAILURE_WORDS = ("iostream error", "unexpected pos", "PytorchStreamWriter", "No space left", "file write failed")


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


# ------------------------------------------------------------------------------------ save
def save_checkpoint(
    engine,
    output_dir: Path,
    step: int,
    rank: int,
    is_main: bool,
    data_state: dict | None = None,
    config=None,
    keep_last: int = 0,
) -> Path:
    """Every rank writes its partitions and RNG states; rank 0 then marks the checkpoint complete
    (with every file's size and checksum), moves the pointer and prunes old checkpoints (keeping
    ``keep_last``; 0 keeps all). A failed write raises ``WriteError`` with its partial directory gone."""
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    directory = root / tag
    if is_main:
        _warn_if_short_of_space(root)
    try:
        # An adapter run's frozen base is the model's own files: only what trains is saved.
        engine.save_checkpoint(
            str(root),
            tag=tag,
            client_state={"step": step, "data": data_state or {}},
            save_latest=False,
            exclude_frozen_parameters=peft_model_of(engine.module) is not None,
        )
        tensors, plain = rng_state()
        save_file(tensors, str(directory / f"rng_rank{rank}.safetensors"))
        (directory / f"rng_rank{rank}.json").write_text(json.dumps(plain))
        barrier()  # every rank's files are on disk
        if is_main and config is not None:
            config.save(directory / "config.yaml")
        barrier()
        _write_manifest_stripe(directory, rank, world_size())
        barrier()
        if is_main:
            _mark_complete(
                directory,
                {
                    "step": step,
                    "world_size": world_size(),
                    "time": time.time(),
                    "data": data_state or {},
                    "files": _merge_manifests(directory),
                },
            )
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(word in str(err) for word in WRITE_FAILURE_WORDS):
            raise  # not a failed write: a bug, with its traceback
        raise _write_failed(directory, err) from None
    if is_main:
        write_text_atomically(root / POINTER, tag)
        if keep_last:
            _prune(root, keep_last)
    barrier()
    return directory


def _write_failed(directory: Path, err: Exception) -> WriteError:
    """The partial checkpoint removed (any rank may: the others are stopped by the launcher)."""
    shutil.rmtree(directory, ignore_errors=True)
    root = directory.parent
    free = shutil.disk_usage(root).free if root.exists() else 0
    complete = complete_checkpoints(root)
    kept = (
        f"{complete[-1]} is still the newest complete checkpoint: rerunning the same command resumes from it"
        if complete
        else "no earlier checkpoint exists"
    )
    return WriteError(
        f"writing checkpoint {directory} failed ({type(err).__name__}: {str(err).strip()}); "
        f"{free / 2**30:.2f} GiB free on {root}. The partial checkpoint was removed; {kept}. "
        "Free space (or move train.output_dir to a larger disk) and rerun"
    )


def _warn_if_short_of_space(root: Path) -> None:
    complete = complete_checkpoints(root)
    if not complete:
        return
    needed = sum(f.stat().st_size for f in complete[-1].rglob("*") if f.is_file())
    free = shutil.disk_usage(root).free
    if free < needed:
        print(
            f"[plot_ds] warning: {free / 2**30:.2f} GiB free on {root}, less than the previous checkpoint "
            f"({needed / 2**30:.2f} GiB): this checkpoint may not fit",
            file=sys.stderr,
            flush=True,
        )


def _checkpoint_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(MANIFEST_PREFIX)
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest_stripe(directory: Path, rank: int, world: int) -> None:
    """Rank r hashes every world-th file: the checksum cost per rank does not grow with R."""
    stripe = {
        str(p.relative_to(directory)): [p.stat().st_size, _file_digest(p)]
        for p in _checkpoint_files(directory)[rank::world]
    }
    (directory / f"{MANIFEST_PREFIX}{rank}.json").write_text(json.dumps(stripe))


def _merge_manifests(directory: Path) -> dict:
    files = {}
    for part in sorted(directory.glob(f"{MANIFEST_PREFIX}*.json")):
        files.update(json.loads(part.read_text()))
        part.unlink()
    return files


def damage(directory: Path, rank: int = 0, world: int = 1) -> str | None:
    """What is wrong with a complete checkpoint (a file missing, of another size, or with another
    checksum than its marker records), or None. Sizes are checked for every file; checksums for
    this rank's stripe. A checkpoint written before checksums existed is taken as it is."""
    files = json.loads((directory / COMPLETE_MARKER).read_text()).get("files")
    if files is None:
        return None
    names = sorted(files)
    for name in names:
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != files[name][0]:
            return f"{path} has {path.stat().st_size} bytes, {files[name][0]} when it was written (truncated?)"
    for name in names[rank::world]:
        if _file_digest(directory / name) != files[name][1]:
            return f"{directory / name} does not match its checksum (altered after it was written)"
    return None


def _verified_everywhere(directory: Path) -> tuple[bool, str | None]:
    """``damage`` on every rank's stripe, agreed by all: (whether it verifies everywhere, what this
    rank found). The rank that found a damaged file says which."""
    problem = damage(directory, current_rank(), world_size())
    if problem:
        print(
            f"[plot_ds] [rank {current_rank()}] checkpoint {directory} is damaged: {problem}",
            file=sys.stderr,
            flush=True,
        )
    return on_every_rank(problem is None), problem


def _mark_complete(directory: Path, info: dict) -> None:
    write_text_atomically(directory / COMPLETE_MARKER, json.dumps(info))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / COMPLETE_MARKER).is_file()
    ]
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
    """``resume``: "auto" (the newest complete checkpoint of this run that verifies, if any),
    "none", or a path (a checkpoint directory, or a run's checkpoints folder), which must verify."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(output_dir)
        pointer = root / POINTER
        complete = complete_checkpoints(root)
        if pointer.is_file() and (root / pointer.read_text().strip()) in complete:
            pointed = root / pointer.read_text().strip()  # newer incomplete ones may exist past the pointer
            complete = [c for c in complete if c.name <= pointed.name]
        for candidate in reversed(complete):
            if _verified_everywhere(candidate)[0]:
                if candidate != (complete[-1] if complete else None) and current_rank() == 0:
                    print(
                        f"[plot_ds] train.resume auto: resuming from {candidate}, the newest checkpoint that verifies",
                        file=sys.stderr,
                        flush=True,
                    )
                return candidate
        if complete and current_rank() == 0:
            print(
                "[plot_ds] train.resume auto: no checkpoint verifies; starting from the model",
                file=sys.stderr,
                flush=True,
            )
        return None
    path = Path(resume)
    if (path / COMPLETE_MARKER).is_file():
        chosen = path
    else:
        complete = complete_checkpoints(path) or complete_checkpoints(checkpoint_root(path))
        if not complete:
            raise CheckpointError(
                f"train.resume: {path} holds no complete plot_ds checkpoint (a step_<N> folder with {COMPLETE_MARKER})"
            )
        chosen = complete[-1]
    verified, problem = _verified_everywhere(chosen)
    if not verified:
        raise CheckpointError(
            f"train.resume: {chosen} is damaged: {problem or 'another rank found a damaged file'}"
            ". Resume from an earlier checkpoint (train.resume PATH) or with train.resume auto, "
            "which picks the newest that verifies"
        )
    return chosen


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
    try:
        with reading_checkpoints_as_data(engine):
            loaded, _ = engine.load_checkpoint(
                str(source.parent),
                tag=source.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                load_module_strict=peft_model_of(engine.module) is None,
            )
    except RuntimeError as err:
        if "Error(s) in loading state_dict" not in str(err) and "size mismatch" not in str(err):
            raise
        raise CheckpointError(
            f"{directory}: its weights do not fit this model ({str(err).splitlines()[0]}); it "
            "was written by a run of another model. Use a new train.output_dir, or set "
            "train.resume none to start over in this one"
        ) from None
    if loaded is None:
        raise CheckpointError(f"{directory}: DeepSpeed could not load it")
    rng_file = directory / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)), json.loads((directory / f"rng_rank{rank}.json").read_text()))
    else:  # a rank the checkpoint did not have: a fresh stream, derived from rank 0's
        set_rng_state(
            load_file(str(directory / "rng_rank0.safetensors")), json.loads((directory / "rng_rank0.json").read_text())
        )
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
