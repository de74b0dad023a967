"""Statistics of a comparison: per variant the mean and spread over seeds of each metric, and for
each variant against the baseline the paired difference over the held-out items (pairs, or
generation prompts) with a percentile-bootstrap 95% interval.

A run's value of a metric is the mean over its items (items without a value, e.g. a generation too
short for a 4-gram, left out). The paired difference of an item is the variant's value minus the
baseline's, averaged over the seeds both have; the bootstrap resamples items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    higher_is_better: bool | None  # None: neither direction is better in itself
    source: str  # "pairs", "generations" or "run"


METRICS = (
    Metric("preference_accuracy", "pref. acc. (len-norm)", True, "pairs"),
    Metric("reward_accuracy", "reward acc. (vs start)", True, "pairs"),
    Metric("reward_margin", "reward margin", True, "pairs"),
    Metric("chosen_nll", "chosen NLL/token", False, "pairs"),
    Metric("chosen_nll_change", "chosen NLL change", False, "pairs"),
    Metric("kl_to_start", "KL to start/token", False, "pairs"),
    Metric("length", "gen. length", None, "generations"),
    Metric("distinct_1", "distinct-1", True, "generations"),
    Metric("distinct_2", "distinct-2", True, "generations"),
    Metric("repeated_4gram_share", "repeated 4-grams", False, "generations"),
    Metric("start_perplexity", "gen. PPL under start", False, "generations"),
    Metric("answer_correct", "answer acc.", True, "generations"),
    Metric("reward", "reward", True, "generations"),
    Metric("win_rate", "win rate vs start", True, "generations"),
    Metric("step_seconds", "s/step", False, "run"),
    Metric("peak_rss_gb", "peak RSS GB", False, "run"),
)


def item_values(records: list[dict], metric: str) -> dict[str, float]:
    """{item id: value} of the records that have a value for ``metric``."""
    return {r["id"]: float(r[metric]) for r in records if r.get(metric) is not None}


def run_value(values: dict[str, float]) -> float | None:
    return float(np.mean(list(values.values()))) if values else None


def mean_and_spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and count; None-free input."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def paired_differences(variant: dict[int, dict[str, float]], baseline: dict[int, dict[str, float]]) -> np.ndarray:
    """Per item present in both: the mean over the common seeds of variant minus baseline.
    ``variant`` and ``baseline``: {seed: {item id: value}}."""
    seeds = sorted(set(variant) & set(baseline))
    differences: dict[str, list[float]] = {}
    for seed in seeds:
        for item, value in variant[seed].items():
            if item in baseline[seed]:
                differences.setdefault(item, []).append(value - baseline[seed][item])
    return np.array([np.mean(d) for _, d in sorted(differences.items())], dtype=np.float64)


def bootstrap_interval(differences: np.ndarray, samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The mean of ``differences`` and its percentile-bootstrap interval (items resampled with
    replacement, ``samples`` times, numpy's generator seeded with ``seed``)."""
    n = len(differences)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, n, size=(samples, n))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(differences.mean()), "low": float(low), "high": float(high), "n": n}


def win_rates(rewards: dict[str, float], start_rewards: dict[str, float]) -> dict[str, float]:
    """Per prompt: 1 where the generation's reward beats the starting model's, 1/2 on a tie."""
    return {
        item: 1.0 if r > start_rewards[item] else 0.5 if r == start_rewards[item] else 0.0
        for item, r in rewards.items()
        if item in start_rewards
    }


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def shown_metrics(summary: dict) -> list[Metric]:
    """The metrics some variant has a value for (no reward column without a reward model)."""
    return [m for m in METRICS if any(v["metrics"][m.name]["n"] for v in summary["variants"].values())]
