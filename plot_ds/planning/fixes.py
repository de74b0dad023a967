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
            found.append(({"parallel.sequence": size, "model.share_prompt": "auto", "data.packing": False}, ""))
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
    config: Config, shape: ModelShape, machine: Machine, lengths: DataLengths, most: int = 4
) -> list[Fix]:
    """Up to ``most`` single changes that fit, nearest first; where none does, the changes in that
    order, added one by one until the run fits; and the longest ``data.max_length`` that fits."""
    fixes, combined, tried = [], {}, []
    for overrides, note in candidates(config, shape, machine):
        changed = with_overrides(config, overrides)
        if changed is None:
            continue
        plan = plan_memory(changed, shape, machine, lengths)
        if plan.fits:
            fixes.append(Fix(overrides, plan, note))
        tried.append(overrides)
    if not fixes:
        for overrides in tried:
            combined.update(overrides)
            changed = with_overrides(config, combined)
            if changed is not None and plan_memory(changed, shape, machine, lengths).fits:
                fixes.append(Fix(dict(combined), plan_memory(changed, shape, machine, lengths), "together"))
                break
    shorter = shortest_cut(config, shape, machine, lengths)
    return fixes[:most] + ([shorter] if shorter else [])


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
