"""When a run does not fit: the settings that make it fit, nearest first. Each candidate is the
run's config with a few overrides, planned again by the same model; the order is how much each
changes the run (how it batches, then what it recomputes, then how it shards, then what it trains
and reads)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..config import Config, ConfigError
from ..config_values import apply_override
from .memory_plan import DataLengths, Machine, MemoryPlan, plan_memory
from .model_shape import ModelShape


@dataclass
class Fix:
    overrides: dict
    plan: MemoryPlan
    note: str = ""

    def describe(self) -> str:
        settings = " ".join(f"--{key} {value}" for key, value in self.overrides.items())
        return f"{settings}: {self.plan.peak_gb:.2f} GiB{f' ({self.note})' if self.note else ''}"


def candidates(config: Config, shape: ModelShape, machine: Machine) -> list[tuple[dict, str]]:
    """Single changes, nearest first."""
    train, found = config.train, []
    size = train.micro_batch_size
    while size > 1:
        size //= 2
        accumulation = train.gradient_accumulation_steps * train.micro_batch_size // size
        found.append(
            (
                {"train.micro_batch_size": size, "train.gradient_accumulation_steps": accumulation},
                "the same global batch",
            )
        )
    if not config.model.gradient_checkpointing:
        found.append(({"model.gradient_checkpointing": True}, "about one more forward per step"))
    if config.model.tiled_head is not True and shape.why_head_not_tiled is None:
        found.append(({"model.tiled_head": True}, ""))
    if not config.model.tiled_mlp:
        found.append(({"model.tiled_mlp": True}, ""))
    if "offload" not in config.deepspeed.config:
        if "zero2" in config.deepspeed.config or (config.deepspeed.config == "auto" and machine.ranks == 1):
            found.append(({"deepspeed.config": "ds_configs/zero3.json"}, ""))
        found.append(({"deepspeed.config": "ds_configs/zero3_offload.json"}, "states in host memory"))
    for size in (2, 4, 8, 16):
        if machine.ranks % size == 0 and shape.heads % size == 0 and size > config.parallel.sequence:
            overrides = {"parallel.sequence": size}
            if config.model.share_prompt is True:
                overrides["model.share_prompt"] = "auto"
            if config.data.packing:
                overrides["data.packing"] = False
            found.append((overrides, "a slice of each row per rank"))
    if not config.adapter.active:
        found.append(({"adapter.method": "lora"}, "adapters on frozen weights"))
    if config.reference.mode == "engine" and not config.adapter.active:
        found.append(({"reference.mode": "cache"}, "reference log-probs computed once before training"))
    return found


def with_overrides(config: Config, overrides: dict) -> Config | None:
    changed = copy.deepcopy(config)
    try:
        for key, value in overrides.items():
            apply_override(changed, key, value)
        return changed.validate()
    except ConfigError:
        return None


def nearest_fixes(
    config: Config,
    shape: ModelShape,
    machine: Machine,
    lengths: DataLengths,
    most: int = 4,
    full_training: bool = False,
) -> list[Fix]:
    """Up to ``most`` single changes that fit, nearest first; where none does, the changes in that
    order, added one by one until the run fits; and the longest ``data.max_length`` that fits.
    ``full_training``: every weight trained on the devices (no adapters, no offload)."""
    fixes, tried = [], []
    for overrides, note in candidates(config, shape, machine):
        if full_training and ("adapter.method" in overrides or "offload" in str(overrides)):
            continue
        changed = with_overrides(config, overrides)
        if changed is None:
            continue
        plan = plan_memory(changed, shape, machine, lengths)
        if plan.fits:
            fixes.append(Fix(overrides, plan, note))
        tried.append(overrides)
    if not fixes:
        # Offload last: it moves the states to host memory at the price of every step's transfers.
        kept = [o for o in tried if "offload" not in str(o.get("deepspeed.config", ""))]
        for changes in (kept, tried):
            together = combined_fix(config, shape, machine, lengths, changes)
            if together is not None:
                fixes.append(together)
                break
    shorter = shortest_cut(config, shape, machine, lengths)
    return fixes[:most] + ([shorter] if shorter else [])


def combined_fix(config: Config, shape: ModelShape, machine: Machine, lengths: DataLengths, changes: list[dict]):
    """``changes`` added one by one (a later value of a key replaces an earlier one) until it fits."""
    combined, kept = {}, []
    for overrides in changes:
        combined.update(overrides)
        kept.append(overrides)
        if fitting_plan(config, shape, machine, lengths, combined) is not None:
            break
    else:
        return None
    for overrides in reversed(kept[:-1]):  # then without each earlier change it did not need
        fewer = [o for o in kept if o is not overrides]
        merged = {key: value for o in fewer for key, value in o.items()}
        if fitting_plan(config, shape, machine, lengths, merged) is not None:
            kept = fewer
    combined = {key: value for o in kept for key, value in o.items()}
    return Fix(combined, fitting_plan(config, shape, machine, lengths, combined), "together")


def fitting_plan(config: Config, shape: ModelShape, machine: Machine, lengths: DataLengths, overrides: dict):
    """The plan with ``overrides`` where it is valid and fits, else None."""
    changed = with_overrides(config, overrides)
    plan = None if changed is None else plan_memory(changed, shape, machine, lengths)
    return plan if plan is not None and plan.fits else None


def shortest_cut(config: Config, shape: ModelShape, machine: Machine, lengths: DataLengths) -> Fix | None:
    """The longest data.max_length under the current one at which the run fits (in steps of 1/16 of
    it), with the share of pairs it would truncate."""
    data = config.data
    for sixteenths in range(15, 0, -1):
        length = data.max_length * sixteenths // 16
        prompt = min(data.max_prompt_length, length // 2)
        changed = with_overrides(config, {"data.max_length": length, "data.max_prompt_length": prompt})
        if changed is None:
            continue
        plan = plan_memory(changed, shape, machine, lengths.clipped(length, prompt))
        if plan.fits:
            share = lengths.truncated_share(length)
            overrides = {"data.max_length": length, "data.max_prompt_length": prompt}
            return Fix(overrides, plan, f"truncates {share:.0%} of the pairs")
    return None


def least_memory(config: Config, shape: ModelShape, machine: Machine, lengths: DataLengths) -> Fix | None:
    """Every change plot-plan knows at once (the largest sequence group, offload, LoRA...): the least
    memory per rank any setting reaches, for a machine nothing fits on."""
    combined = {}
    for overrides, _ in candidates(config, shape, machine):
        if with_overrides(config, {**combined, **overrides}) is not None:
            combined.update(overrides)
    changed = with_overrides(config, combined)
    return None if changed is None else Fix(combined, plan_memory(changed, shape, machine, lengths), "all at once")
