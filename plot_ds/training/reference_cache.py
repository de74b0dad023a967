"""Precomputed reference log-probs: one pass over the data before training, then no reference
model in memory.

The file (safetensors, no pickle) records the fingerprints it was made from: the tokenised data
of each split (which includes the tokenizer), the tokenizer, the reference model and the
precision. A file whose fingerprints differ from this run's is refused, naming what changed.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..engine.adapters import BaseOfPolicy, base_is_reference, peft_model_of
from ..assets import cache_dir, resolve_model_path
from ..atomic import atomic_file
from ..data import DataError, collate, eval_shards
from ..data.tokenize import tokenizer_fingerprint
from ..distributed.process_group import all_reduce_sum, barrier
from ..engine.ds_config import precision_of
from ..engine.engines import build_reference_engine, destroy_engine
from .host_memory import release_freed_memory
from ..forward.micro_batch import PairModels, forward_micro_batch
from ..pair_batch import ForwardNeeds
from ..forward.reference import CachedReference, LiveReference, Reference

FULL_HASH_LIMIT = 1 << 30
SAMPLE_BLOCK, SAMPLES = 1 << 20, 64


def _file_fingerprint(path: Path) -> dict:
    """SHA-256 of a weight file up to 1 GiB; above, of its safetensors header (names, shapes,
    dtypes, offsets) and 64 evenly spaced 1 MiB blocks, so that a 100 GB checkpoint is not read on
    every run (any fine-tuning changes every block)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: handle.read(SAMPLE_BLOCK), b""):
                digest.update(block)
        else:
            if path.suffix == ".safetensors":
                header_len = int.from_bytes(handle.read(8), "little")
                digest.update(handle.read(min(header_len, size)))
            for i in range(SAMPLES):
                handle.seek((size - SAMPLE_BLOCK) * i // (SAMPLES - 1))
                digest.update(handle.read(SAMPLE_BLOCK))
    return {"name": path.name, "size": size, "sha256": digest.hexdigest()}


def model_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    folder = Path(resolve_model_path(name_or_path))
    if not folder.is_dir():  # a hub id: the same local snapshot from_pretrained would load
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(str(folder), revision=revision, allow_patterns=["*.json", "*.safetensors", "*.bin"])
        )
    parts = [json.loads((folder / "config.json").read_text())] if (folder / "config.json").is_file() else []
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise DataError(f"{folder}: no weight files to fingerprint the reference model")
    parts += [_file_fingerprint(p) for p in weights]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def expected_metadata(config, tokenizer, reports, ds_config) -> dict[str, str]:
    reference = config.reference.name_or_path or config.model.name_or_path
    precision = precision_of(ds_config)
    return {
        "data_train": reports[0].fingerprint,
        "data_eval": reports[1].fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer)[:32],
        "reference_model": model_fingerprint(reference, config.model.revision),
        "precision": precision,
    }


def cache_file(config, metadata: dict[str, str]) -> Path:
    if config.reference.cache_path:
        return Path(config.reference.cache_path)
    key = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "reference_logps" / f"{key}.safetensors"


@torch.no_grad()
def compute_logps(engine, layout, examples, batch_size: int, pad_id: int, dist) -> torch.Tensor:
    """[N, 2] summed log-probs of (chosen, rejected), each pair computed by one data-parallel rank
    (a sequence group's first rank writes what its group computed)."""
    from tqdm.auto import tqdm

    values = torch.zeros(len(examples), 2, dtype=torch.float64, device=engine.device)
    shards = eval_shards(len(examples), batch_size, dist.data_rank, dist.data_ranks)
    writes = layout.sequence is None or layout.sequence.first
    for indices in tqdm(shards, desc="reference log-probs", unit="batch", disable=dist.rank != 0):
        batch = collate([examples[i] for i in indices], pad_id, filler=examples[0])
        logps = forward_micro_batch(PairModels(engine, layout), batch, ForwardNeeds()).policy.logps
        if indices and writes:
            rows = torch.tensor(indices, device=engine.device)
            values[rows, 0] = logps.chosen.double()
            values[rows, 1] = logps.rejected.double()
    return all_reduce_sum(values).cpu()  # float64, as the policy's sums (ResponseTokens.row_sums)


def _save(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as staging:
        save_file(tensors, str(staging), metadata=metadata)


def load_checked(path: Path, expected: dict[str, str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        found = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    changed = [key for key in expected if found.get(key) != expected[key]]
    if changed:
        details = "; ".join(f"{key}: file {found.get(key)!r}, this run {expected[key]!r}" for key in changed)
        raise DataError(
            f"{path}: reference log-probs were computed for other inputs ({details}). Remove "
            f"reference.cache_path to compute a fresh cache, or point it at the matching file"
        )
    return tensors


def reference_pass(open_reference, splits: dict, batch_size: int, pad_id: int, dist) -> dict[str, torch.Tensor]:
    """Log-probs of every non-empty split; ``open_reference()`` is a context manager giving the
    (engine, row layout) for this pass only."""
    with open_reference() as (engine, layout):
        return {
            name: compute_logps(engine, layout, examples, batch_size, pad_id, dist)
            for name, examples in splits.items()
            if examples
        }


@contextmanager
def temporary_reference_engine(config, ds_config, sequence=None):
    """A reference engine that lives only for the block."""
    engine, layout = build_reference_engine(config, ds_config, sequence)
    try:
        yield engine, layout
    finally:
        destroy_engine(engine)


def cached_reference(run, open_reference) -> CachedReference:
    """Load (or compute once, then load) the cache of ``run``'s pairs, both splits in one file."""
    config, dist = run.config, run.dist
    expected = expected_metadata(config, run.tokenizer, run.reports, run.ds_config)
    path = cache_file(config, expected)
    if not path.is_file():
        if dist.is_main:
            print(f"[plot_ds] computing reference log-probs once into {path}", flush=True)
        splits = reference_pass(
            open_reference,
            {"train": run.train_examples, "eval": run.eval_examples},
            config.train.eval_batch_size,
            run.pad_id,
            dist,
        )
        release_freed_memory()  # the reference engine is unreachable now
        if dist.is_main:
            _save(path, splits, expected)
        barrier()
    elif dist.is_main:
        print(f"[plot_ds] reference log-probs from {path}", flush=True)
    tensors = load_checked(path, expected)
    for name, examples in (("train", run.train_examples), ("eval", run.eval_examples)):
        if examples and tensors[name].shape[0] != len(examples):
            raise DataError(f"{path}: holds {tensors[name].shape[0]} {name} pairs, this run has {len(examples)}")
    return CachedReference(tensors)


def prepare_reference(run) -> Reference | None:
    """The reference side of a ``training.run.Run`` being set up (its policy and objective built):
    None when the objective needs none; with ``reference.mode: cache``, the log-probs computed once;
    else the frozen reference engine, or, for adapters on their own base, the policy engine with its
    adapters off (``adapters.BaseOfPolicy``)."""
    if not run.objective.needs.reference:
        return None
    config, ds_config, sequence = run.config, run.ds_config, run.policy_layout.sequence
    adapted = peft_model_of(run.policy.module) is not None
    base = (BaseOfPolicy(run.policy), run.policy_layout) if adapted and base_is_reference(config) else None
    if config.reference.mode == "engine":
        return LiveReference(*(base or build_reference_engine(config, ds_config, sequence)))
    open_reference = (
        (lambda: nullcontext(base)) if base else (lambda: temporary_reference_engine(config, ds_config, sequence))
    )
    return cached_reference(run, open_reference)
