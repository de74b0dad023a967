"""The comparison's results: every evaluated run read back, checked comparable (the same held-out
pairs and prompts), summarised (``stats``) and written as compare.json, compare.md and compare.png.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text_atomically
from ..config import ConfigError
from .grid import Grid
from .runner import run_directory
from .stats import (
    METRICS,
    bootstrap_interval,
    finite,
    item_values,
    mean_and_spread,
    paired_differences,
    run_value,
    shown_metrics,
    win_rates,
)


@dataclass
class RunResult:
    variant: str
    seed: int
    items: dict[str, dict[str, float]]  # metric -> {item id: value}
    history: list[dict] = field(default_factory=list)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def run_items(evaluation: dict, start_rewards: dict[str, float]) -> dict[str, dict[str, float]]:
    items = {}
    for metric in METRICS:
        if metric.source in ("pairs", "generations"):
            items[metric.name] = item_values(evaluation[metric.source], metric.name)
    if items.get("reward") and start_rewards:
        items["win_rate"] = win_rates(items["reward"], start_rewards)
    return items


def run_costs(directory: Path, history: list[dict]) -> dict[str, dict[str, float]]:
    """The run-level metrics, as one-item maps: the median time per step after the first (which
    holds the warm-up; the first alone for a one-step run) and the largest resident memory of a
    training rank."""
    record = _read_json(directory / "compare_run.json") or {}
    steps = [h["throughput/seconds_per_step"] for h in history if "throughput/seconds_per_step" in h]
    steps = steps[1:] or steps
    costs = {}
    if steps:
        costs["step_seconds"] = {"run": statistics.median(steps)}
    # The step log's peak spans every launch of a resumed run (and a run killed after it finished, which
    # the grid then never relaunches); runs logged before that metric existed have the launcher's figure.
    logged = [h["memory/peak_host_gb"] for h in history if "memory/peak_host_gb" in h]
    if logged:
        costs["peak_rss_gb"] = {"run": max(logged)}
    elif "train_peak_rss_mb" in record:
        costs["peak_rss_gb"] = {"run": record["train_peak_rss_mb"] / 1024}
    return costs


def collect(grid: Grid, output: Path) -> tuple[dict | None, list[RunResult]]:
    """(the starting model's evaluation, every evaluated run), refusing runs evaluated on other
    held-out pairs than the starting model's."""
    start = _read_json(run_directory(output, None) / "compare_eval.json")
    start_rewards = item_values(start["generations"], "reward") if start else {}
    results = []
    for spec in grid.runs():
        directory = run_directory(output, spec)
        evaluation = _read_json(directory / "compare_eval.json")
        if evaluation is None:
            continue
        if start is not None and evaluation["held_out_ids"] != start["held_out_ids"]:
            raise ConfigError(
                f"{directory} was evaluated on other held-out pairs than the starting model: the runs "
                "are not comparable (were data settings changed between runs?)"
            )
        history = (
            [json.loads(line) for line in (directory / "train_history.jsonl").read_text().splitlines() if line.strip()]
            if (directory / "train_history.jsonl").is_file()
            else []
        )
        items = {**run_items(evaluation, start_rewards), **run_costs(directory, history)}
        results.append(RunResult(spec.variant, spec.seed, items, history))
    return start, results


def summarise(grid: Grid, start: dict | None, results: list[RunResult]) -> dict:
    """compare.json's content: per variant each metric's mean and spread over seeds, the starting
    model's value, and each variant's paired difference from the baseline with its interval."""
    start_items = run_items(start, {}) if start else {}
    variants: dict[str, dict] = {}
    for variant in grid.variants:
        runs = [r for r in results if r.variant == variant]
        summary = {"seeds": [r.seed for r in runs], "metrics": {}}
        for metric in METRICS:
            per_seed = {r.seed: run_value(r.items.get(metric.name, {})) for r in runs}
            values = [v for v in per_seed.values() if finite(v)]
            summary["metrics"][metric.name] = {**mean_and_spread(values), "per_seed": per_seed}
        variants[variant] = summary
    versus = {}
    baseline_runs = {r.seed: r for r in results if r.variant == grid.baseline}
    for variant in grid.variants:
        if variant == grid.baseline:
            continue
        runs = {r.seed: r for r in results if r.variant == variant}
        versus[variant] = {}
        for metric in METRICS:
            if metric.source == "run":
                continue
            differences = paired_differences(
                {s: r.items.get(metric.name, {}) for s, r in runs.items()},
                {s: r.items.get(metric.name, {}) for s, r in baseline_runs.items()},
            )
            versus[variant][metric.name] = bootstrap_interval(differences)
    return {
        "baseline": grid.baseline,
        "seeds": grid.seeds,
        "metrics": [
            {"name": m.name, "label": m.label, "higher_is_better": m.higher_is_better, "source": m.source}
            for m in METRICS
        ],
        "start": {m.name: run_value(start_items.get(m.name, {})) for m in METRICS if m.source != "run"},
        "variants": variants,
        "versus_baseline": versus,
    }


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if not finite(value) else f"{value:.{digits}g}"


def markdown(summary: dict) -> str:
    metrics = shown_metrics(summary)
    arrows = {True: " ↑", False: " ↓", None: ""}
    head = "| variant | seeds | " + " | ".join(m.label + arrows[m.higher_is_better] for m in metrics) + " |"
    rows = [head, "|" + " --- |" * (len(metrics) + 2)]
    start = summary["start"]
    rows.append("| start (no training) | – | " + " | ".join(_number(start.get(m.name)) for m in metrics) + " |")
    for variant, values in summary["variants"].items():
        cells = []
        for m in metrics:
            cell = values["metrics"][m.name]
            spread = f" ± {_number(cell['std'], 2)}" if cell["n"] > 1 else ""
            cells.append(_number(cell["mean"]) + spread)
        rows.append(f"| {variant} | {len(values['seeds'])} | " + " | ".join(cells) + " |")
    lines = ["## Mean ± standard deviation over seeds", "", *rows, ""]
    paired = [m for m in metrics if m.source != "run"]
    lines += [
        f"## Paired difference from {summary['baseline']} over held-out items (95% bootstrap interval)",
        "",
        "| variant | " + " | ".join(m.label for m in paired) + " |",
        "|" + " --- |" * (len(paired) + 1),
    ]
    for variant, values in summary["versus_baseline"].items():
        cells = []
        for m in paired:
            d = values[m.name]
            cells.append("–" if not d["n"] else f"{d['mean']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(grid: Grid, output: Path, name: str = "compare") -> dict:
    """NAME.json, NAME.md and NAME.png in ``output`` (several reports can share one set of runs,
    e.g. the seeded grid and a one-seed exploration); returns the summary."""
    start, results = collect(grid, output)
    summary = summarise(grid, start, results)
    write_text_atomically(output / f"{name}.json", json.dumps(summary, indent=2))
    write_text_atomically(output / f"{name}.md", markdown(summary))
    from .figure import draw

    draw(summary, results, output / f"{name}.png")
    return summary
