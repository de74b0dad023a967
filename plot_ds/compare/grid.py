"""A comparison grid: one base config, named variants (a handful of overrides each), seeds and
optional sweeps, expanded into runs that are checked, before anything trains, to be comparable:
the same starting model, data, held-out pairs, steps and global batch for every run.

A grid file (YAML)::

    config: dpo.yaml               # the base config (relative to this file); optional
    overrides: {train.max_steps: 40, data.eval_size: 40}   # for every run
    seeds: [1, 2, 3]               # train.seed: the data order and dropout; the held-out carve stays
    baseline: dpo                  # the variant the others are compared against, pair by pair
    variants:
      dpo: {plot.enabled: false}
      dpo+plot: {}
    sweeps:                        # more variants, one per value: dpo+plot[plot.alpha=0.3]
      dpo+plot: {plot.alpha: [0.3, 3]}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError, load_config
from ..config_values import read_yaml_file

# What must be equal for two runs to be compared: the starting model, the data and its held-out
# carve, the steps and the batch. A variant or sweep that changes one of these is refused.
SHARED_KEYS = (
    "model.name_or_path",
    "model.revision",
    "data.*",
    "train.max_steps",
    "train.micro_batch_size",
    "train.gradient_accumulation_steps",
)
GRID_KEYS = {"config", "overrides", "seeds", "baseline", "variants", "sweeps"}

# The paper's comparison: DPO and SFT with and without PLOT, and the plain NLL term at PLOT's weight.
STANDARD_VARIANTS = {
    "dpo": {"objective.name": "dpo", "plot.enabled": False},
    "dpo+plot": {"objective.name": "dpo", "plot.enabled": True},
    "dpo+sft": {"objective.terms": {"dpo": 1.0, "sft": 1.0}, "plot.enabled": False},
    "sft": {"objective.name": "sft", "plot.enabled": False, "reference.mode": "none"},
    "sft+plot": {"objective.name": "sft", "plot.enabled": True, "reference.mode": "none"},
}


@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    overrides: dict  # base overrides, then the variant's, then train.seed

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"


@dataclass
class Grid:
    base: str | None  # the base config file
    overrides: dict[str, Any]  # for every run
    variants: dict[str, dict]
    seeds: list[int]
    baseline: str

    def runs(self) -> list[RunSpec]:
        """Seed-major: the first seed of every variant finishes before the second starts, so an
        interrupted grid already compares every variant."""
        return [
            RunSpec(variant, seed, {**self.overrides, **overrides, "train.seed": seed})
            for seed in self.seeds
            for variant, overrides in self.variants.items()
        ]

    def config_of(self, spec: RunSpec, output_dir: Path) -> Config:
        return load_config(self.base, {**spec.overrides, "train.output_dir": str(output_dir)})

    def start_config(self) -> Config:
        """The base config as it evaluates the starting model (the first seed's settings)."""
        return load_config(self.base, {**self.overrides, "train.seed": self.seeds[0]})


def sweep_variants(variants: dict[str, dict], sweeps: dict[str, dict]) -> dict[str, dict]:
    """``{"dpo+plot": {"plot.alpha": [0.3, 3]}}`` adds ``dpo+plot[plot.alpha=0.3]`` and
    ``dpo+plot[plot.alpha=3]``; ``*`` sweeps every variant."""
    swept = dict(variants)
    for target, keys in sweeps.items():
        names = list(variants) if target == "*" else [target]
        if target != "*" and target not in variants:
            raise ConfigError(f"sweep over '{target}': no such variant (variants: {', '.join(variants)})")
        for name in names:
            for key, values in keys.items():
                for value in values if isinstance(values, list) else [values]:
                    swept[f"{name}[{key}={value}]"] = {**variants[name], key: value}
    return swept


def parse_sweep(text: str) -> tuple[str, dict]:
    """``[VARIANT:]KEY=V1,V2,...`` (the command line's --sweep) -> (variant or "*", {KEY: [values]})."""
    target, _, assignment = text.rpartition(":") if ":" in text.split("=", 1)[0] else ("*", "", text)
    key, sep, raw = assignment.partition("=")
    if not sep or not key or not raw:
        raise ConfigError(f"--sweep {text!r}: expected [VARIANT:]section.key=V1,V2 (e.g. plot.alpha=0.1,0.3,1)")
    return target, {key: [yaml.safe_load(v) for v in raw.split(",")]}


def _read_grid_file(path: Path) -> dict:
    tree = read_yaml_file(path, "grid file")
    if not isinstance(tree, dict) or set(tree) - GRID_KEYS:
        unknown = sorted(set(tree) - GRID_KEYS) if isinstance(tree, dict) else ["(not a mapping)"]
        raise ConfigError(
            f"{path}: unknown grid key(s) {', '.join(map(str, unknown))}; "
            f"a grid file has {', '.join(sorted(GRID_KEYS))}"
        )
    return tree


def build_grid(
    grid_file: str | Path | None = None,
    base: str | None = None,
    overrides: dict | None = None,
    seeds: list[int] | None = None,
    only: list[str] | None = None,
    sweeps: list[str] = (),
    baseline: str | None = None,
) -> Grid:
    """The grid of a grid file (default: the standard variants on the default config), with the
    command line's base config, overrides, seeds, variant selection and sweeps on top; every run
    validated and the whole grid checked comparable."""
    tree = _read_grid_file(Path(grid_file)) if grid_file else {}
    here = Path(grid_file).parent if grid_file else Path(".")
    base = base or (str(here / tree["config"]) if tree.get("config") else None)
    variants = {str(k): dict(v or {}) for k, v in (tree.get("variants") or STANDARD_VARIANTS).items()}
    sweep_table = dict(tree.get("sweeps") or {})
    for text in sweeps:
        target, keys = parse_sweep(text)
        sweep_table.setdefault(target, {}).update(keys)
    variants = sweep_variants(variants, sweep_table)
    if only:
        missing = [name for name in only if name not in variants]
        if missing:
            raise ConfigError(f"unknown variant(s) {', '.join(missing)} (variants: {', '.join(variants)})")
        variants = {name: variants[name] for name in only}
    baseline = baseline or tree.get("baseline") or next(iter(variants))
    if baseline not in variants:
        raise ConfigError(f"baseline '{baseline}' is not a variant of the grid (variants: {', '.join(variants)})")
    grid = Grid(
        base,
        {**(tree.get("overrides") or {}), **(overrides or {})},
        variants,
        [int(s) for s in (seeds or tree.get("seeds") or [1])],
        baseline,
    )
    check_comparable(grid)
    return grid


def _shared_values(config: Config) -> dict[str, Any]:
    flat = {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}
    return {key: value for key, value in flat.items() if key in SHARED_KEYS or f"{key.split('.')[0]}.*" in SHARED_KEYS}


def check_comparable(grid: Grid) -> None:
    """Every run's config is valid (unknown keys and bad values named with their variant), and no
    variant changes what the runs must share."""
    shared = None
    for spec in grid.runs():
        try:
            config = grid.config_of(spec, Path("unused"))
        except ConfigError as err:
            raise ConfigError(f"variant '{spec.variant}' (seed {spec.seed}): {err}") from None
        values = _shared_values(config)
        if shared is None:
            shared = (spec.variant, values)
            continue
        differing = sorted(k for k in values if values[k] != shared[1][k])
        if differing:
            key = differing[0]
            raise ConfigError(
                f"variants '{shared[0]}' and '{spec.variant}' differ in {', '.join(differing)} "
                f"({shared[1][key]!r} vs {values[key]!r}): runs that differ in model, data, held-out pairs, steps "
                "or batch are not comparable; set these in the grid's overrides, for every run"
            )


def differences(saved: dict, wanted: dict) -> list[str]:
    """The keys in which a run's saved config (``Config.to_dict``) differs from the one the grid
    would give it now, as ``section.key: saved -> wanted``. A key the saved config lacks (written by
    an older plot_ds) counts only when the grid now sets it to other than its default."""
    defaults = Config().to_dict()
    found = []
    for section, values in wanted.items():
        for key, value in values.items():
            before = saved.get(section, {}).get(key, "(absent)")
            if before == "(absent)" and value == defaults[section][key]:
                continue
            if before != value and key != "output_dir":
                found.append(f"{section}.{key}: {before!r} -> {value!r}")
    return found
