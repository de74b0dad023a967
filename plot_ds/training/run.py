"""A run set up in one place (torchtune's recipe shape): config in, a ``Run`` out, holding the
tokenizer, the datasets and their reports, the sampler, the policy engine, the objective and the
reference. Training, ``plot-eval``, the benchmarks and the test workers all start here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


from .checkpointing import find_checkpoint
from ..config import Config, ConfigError
from ..data import DataError, DataReport, GlobalBatchSampler, TokenizedPair, collate, prepare_datasets
from ..distributed.process_group import DistInfo, barrier, init_distributed, sequence_group
from ..engine.ds_config import resolve_ds_config
from ..distributed.embedding_slice import embedding_rows_for
from ..engine.engines import build_frozen_engine, build_policy_engine
from ..engine.models import load_tokenizer
from ..forward.micro_batch import PairModels
from ..objectives.objective import Objective, build_objective
from ..pair_batch import PairBatch
from ..forward.pair_forward import ForwardLayout
from ..forward.reference import Reference
from ..planning.check import machine_of_run, plan_before_loading
from ..planning.memory_plan import MemoryPlan
from .reference_cache import prepare_reference
from .rng import seed_everything


@dataclass
class Run:
    config: Config
    dist: DistInfo
    ds_config: dict
    tokenizer: Any
    train_examples: list[TokenizedPair]
    eval_examples: list[TokenizedPair]
    reports: list[DataReport]
    sampler: GlobalBatchSampler | None  # None for a frozen policy
    policy: Any  # the DeepSpeed engine
    policy_layout: ForwardLayout  # prompt sharing or packing; the head tiled or whole
    objective: Objective
    reference: Reference | None  # a frozen engine or cached log-probs; None when not needed
    resume_from: Path | None  # the checkpoint this run continues from
    plan: MemoryPlan | None = None  # the memory plan made before loading (plan.check off: None)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def micro_batches(self, step: int) -> list[PairBatch]:
        """This rank's collated micro-batches of optimizer step ``step`` (0-based)."""
        return [
            indexed_batch(self.train_examples, indices, self.pad_id) for indices in self.sampler.micro_batches(step)
        ]

    def models(self, split: str) -> PairModels:
        """What a micro-batch of ``split``'s pairs runs through."""
        return PairModels(self.policy, self.policy_layout, self.reference, split)


def indexed_batch(examples: list[TokenizedPair], indices: list[int], pad_id: int) -> PairBatch:
    """The collated batch of ``examples[indices]`` (the first example as a filler where ``indices``
    is empty), with each pair's index in ``examples`` (``example_index``)."""
    return collate([examples[i] for i in indices], pad_id, examples[0], indices=indices)


def sequence_parallel_dist(config: Config, dist: DistInfo) -> DistInfo:
    """``dist`` with its sequence groups of ``parallel.sequence`` ranks; a world they do not divide
    is a ``ConfigError``."""
    size = config.parallel.sequence
    if dist.world_size % size:
        raise ConfigError(
            f"parallel.sequence {size}: the {dist.world_size} ranks of this launch do not split into "
            f"groups of {size}; launch a multiple of {size} ranks or change parallel.sequence"
        )
    return replace(dist, sequence=size)


def setup_run(config: Config, dist: DistInfo | None = None, frozen_model: str | None = None) -> Run:
    """Everything a run needs, built in a fixed order (the random streams depend on it). The policy
    is trained from ``model.name_or_path`` (resuming per ``train.resume``), or with ``frozen_model``
    a frozen engine of that model is evaluated. Sets ``config.deepspeed.config`` to the file chosen."""
    dist = sequence_parallel_dist(config, dist or init_distributed())
    seed_everything(config.train.seed)
    trains = frozen_model is None
    resume_from = find_checkpoint(config.train.resume, Path(config.train.output_dir)) if trains else None
    config.deepspeed.config, ds_config = resolve_ds_config(config, dist.world_size, resume_from)
    tokenizer = load_tokenizer(config)
    train_examples, eval_examples, reports = prepare_datasets(
        config.data, tokenizer, preparer=dist.local_rank == 0, sync=barrier
    )
    if not trains and not eval_examples:
        raise DataError("no held-out pairs to evaluate on: set data.eval_source, data.eval_split or data.eval_size")
    sampler, plan = None, None
    if trains:  # the memory plan, before any weight is read
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        machine = machine_of_run(config, dist.world_size, ranks_per_node, dist.device.type)
        plan = plan_before_loading(config, machine, train_examples, ds_config, dist.is_main)
        train = config.train
        sampler = GlobalBatchSampler(
            len(train_examples),
            train.micro_batch_size,
            train.gradient_accumulation_steps,
            dist.data_rank,
            dist.data_ranks,
            train.seed,
        )
        policy, policy_layout = build_policy_engine(config, ds_config, sequence_group(dist))
    else:
        policy, policy_layout = build_frozen_engine(config, ds_config, frozen_model, sequence=sequence_group(dist))
    objective = build_objective(config, embedding_rows_for(policy.module, config.plot))
    run = Run(
        config,
        dist,
        ds_config,
        tokenizer,
        train_examples,
        eval_examples,
        reports,
        sampler,
        policy,
        policy_layout,
        objective,
        reference=None,
        resume_from=resume_from,
        plan=plan,
    )
    run.reference = prepare_reference(run)
    return run
