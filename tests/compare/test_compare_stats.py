"""plot_ds/compare/stats.py, text_metrics.py and the summary of report.py against hand computations
on fixed numbers and strings."""

import math

import numpy as np
import pytest

from plot_ds.compare.grid import build_grid
from plot_ds.compare.report import RunResult, markdown, summarise
from plot_ds.compare.stats import bootstrap_interval, mean_and_spread, paired_differences, run_value, win_rates
from plot_ds.compare.text_metrics import distinct_n, repeated_ngram_share


def test_distinct_n_and_repeated_4grams_on_fixed_strings():
    assert distinct_n("the cat the cat", 1) == 2 / 4
    assert distinct_n("the cat the cat", 2) == 2 / 3  # (the cat), (cat the), (the cat)
    assert distinct_n("one", 2) is None
    assert repeated_ngram_share("a b c d a b c d") == 1 / 5  # 5 four-grams, (a b c d) twice
    assert repeated_ngram_share("a b c d e f") == 0.0
    assert repeated_ngram_share("x x x x x x x x") == 4 / 5
    assert repeated_ngram_share("too short") is None


def test_mean_and_spread_is_the_sample_standard_deviation():
    assert mean_and_spread([1.0, 2.0, 4.0]) == {"mean": 7 / 3, "std": pytest.approx(math.sqrt(7 / 3)), "n": 3}
    assert mean_and_spread([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_and_spread([])["n"] == 0


def test_paired_differences_average_over_common_seeds_per_item():
    variant = {1: {"a": 1.0, "b": 2.0}, 2: {"a": 3.0, "b": 0.0}, 3: {"a": 9.0}}
    baseline = {1: {"a": 0.5, "b": 1.0}, 2: {"a": 1.0}}
    # a: mean(1 - 0.5, 3 - 1) = 1.25; b: only seed 1: 1.0; seed 3 has no baseline
    assert paired_differences(variant, baseline).tolist() == [1.25, 1.0]


def test_bootstrap_interval_matches_a_hand_computation_with_the_same_seed():
    differences = np.array([0.2, -0.1, 0.4, 0.0, 0.3])
    result = bootstrap_interval(differences, samples=500, seed=7)
    rng = np.random.default_rng(7)
    indices = rng.integers(0, 5, size=(500, 5))
    means = sorted(sum(differences[i] for i in row) / 5 for row in indices)

    # numpy's default percentile: linear between order statistics at (n - 1) * q
    def percentile(q):
        position = (len(means) - 1) * q
        low, high = math.floor(position), math.ceil(position)
        return means[low] + (means[high] - means[low]) * (position - low)

    assert result["mean"] == pytest.approx(0.16)
    assert result["low"] == pytest.approx(percentile(0.025)) and result["high"] == pytest.approx(percentile(0.975))
    assert result["low"] < 0.16 < result["high"] and result["n"] == 5
    constant = bootstrap_interval(np.array([0.5, 0.5, 0.5]))
    assert constant["low"] == constant["high"] == 0.5


def test_win_rates_count_ties_as_half():
    assert win_rates({"a": 1.0, "b": 0.0, "c": 2.0, "d": 5.0}, {"a": 0.0, "b": 1.0, "c": 2.0}) == {
        "a": 1.0,
        "b": 0.0,
        "c": 0.5,
    }


def fake_run(variant, seed, accuracy, nll):
    return RunResult(
        variant,
        seed,
        {
            "preference_accuracy": dict(zip("abcd", accuracy)),
            "chosen_nll": dict(zip("abcd", nll)),
            "step_seconds": {"run": 2.0 + seed},
        },
    )


def test_the_summary_and_table_on_fixed_runs():
    grid = build_grid(seeds=[1, 2], only=["dpo", "dpo+plot"])
    results = [
        fake_run("dpo", 1, [1, 0, 0, 1], [2.0, 2.0, 2.0, 2.0]),
        fake_run("dpo", 2, [1, 1, 0, 0], [3.0] * 4),
        fake_run("dpo+plot", 1, [1, 1, 1, 1], [1.0] * 4),
        fake_run("dpo+plot", 2, [1, 1, 1, 0], [2.0] * 4),
    ]
    start = {"pairs": [{"id": i, "preference_accuracy": 0.0, "chosen_nll": 4.0} for i in "abcd"], "generations": []}
    summary = summarise(grid, start, results)
    accuracy = summary["variants"]["dpo+plot"]["metrics"]["preference_accuracy"]
    assert accuracy["mean"] == pytest.approx((1.0 + 0.75) / 2) and accuracy["n"] == 2
    assert accuracy["std"] == pytest.approx(np.std([1.0, 0.75], ddof=1))
    assert accuracy["per_seed"] == {1: 1.0, 2: 0.75}
    assert summary["variants"]["dpo"]["metrics"]["step_seconds"]["mean"] == 3.5
    assert summary["start"]["chosen_nll"] == 4.0
    versus = summary["versus_baseline"]["dpo+plot"]
    # per pair, the mean over seeds of (plot - dpo): a: 0, b: 0.5, c: 1, d: 0
    assert versus["preference_accuracy"]["mean"] == pytest.approx(0.375)
    assert versus["chosen_nll"]["mean"] == pytest.approx(-1.0) and versus["chosen_nll"]["low"] == pytest.approx(-1.0)
    table = markdown(summary)
    assert "| dpo+plot | 2 | 0.875 ± 0.18 | 1.5 ± 0.71 |" in table
    assert "| start (no training) | – | 0 | 4 |" in table
    assert "+0.375 [" in table and "reward" not in table  # no reward model: no reward column
    assert run_value({}) is None
