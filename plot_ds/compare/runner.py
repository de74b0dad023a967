"""Running a comparison grid: each (variant, seed) trains as its own run directory through the
user's launcher, then its final model (and, once, the starting model) is evaluated against the
starting model. A rerun skips evaluated runs, resumes unfinished ones (train.resume: auto), and
refuses a run directory whose saved settings differ from what the grid now asks for.

    <output>/runs/start/                      the starting model's evaluation
    <output>/runs/<variant>/seed<k>/          grid_run.yaml, train.log, the run's own files,
                                              compare_eval.json, compare_run.json
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from ..atomic import write_text_atomically
from ..config import Config, ConfigError
from ..training.preemption import EXIT_PREEMPTED
from .grid import Grid, RunSpec, differences

ENTRY = Path(__file__).resolve().parent.parent / "launch_entry.py"
START = "start"


def run_directory(output: Path, spec: RunSpec | None) -> Path:
    if spec is None:
        return output / "runs" / START
    return output / "runs" / re.sub(r"[^A-Za-z0-9+=.,_-]", "_", spec.variant) / f"seed{spec.seed}"


@dataclass
class PlannedRun:
    spec: RunSpec | None  # None: the starting model, evaluated only
    directory: Path
    config: Config

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else START

    @property
    def evaluation(self) -> Path:
        return self.directory / "compare_eval.json"

    @property
    def trained(self) -> bool:
        return self.spec is None or (
            (self.directory / "final_model" / "config.json").is_file()
            and (self.directory / "eval_results.json").is_file()
        )


def plan(grid: Grid, output: Path) -> list[PlannedRun]:
    """Every run's directory and config (the starting model first); a directory already holding a
    run of other settings is refused, naming the keys, before anything trains."""
    planned = [PlannedRun(None, run_directory(output, None), grid.start_config())]
    for spec in grid.runs():
        directory = run_directory(output, spec)
        planned.append(PlannedRun(spec, directory, grid.config_of(spec, directory)))
    for run in planned:
        saved = run.directory / "grid_run.yaml"
        if saved.is_file():
            changed = differences(yaml.safe_load(saved.read_text()) or {}, run.config.to_dict())
            if changed:
                raise ConfigError(
                    f"{run.directory} holds a run of other settings ({'; '.join(changed[:3])}"
                    f"{'; ...' if len(changed) > 3 else ''}): it would not be comparable. Use "
                    "another --output, or delete that directory to retrain it"
                )
    return planned


@dataclass
class Launched:
    returncode: int
    seconds: float
    peak_rss_mb: float  # the largest resident set of the launched process and its children (the ranks)


def launch(argv: list[str], log_path: Path) -> Launched:
    """Run ``argv`` with its output appended to ``log_path``; a Ctrl-C reaches the child too (same
    process group): wait for it to stop cleanly (it checkpoints), then pass the interrupt on."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except KeyboardInterrupt:
            process.wait()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    return Launched(process.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024)


@dataclass
class Progress:
    total: int
    say: Callable[[str], None] = print
    durations: list[float] = field(default_factory=list)
    done: int = 0

    def report(self, run: PlannedRun, status: str, seconds: float = 0.0) -> None:
        self.done += 1
        if seconds:
            self.durations.append(seconds)
        left = self.total - self.done
        eta = ""
        if left and self.durations:
            remaining = left * sum(self.durations) / len(self.durations)
            eta = f"; about {_duration(remaining)} for the {left} left"
        self.say(f"[plot-compare] {self.done}/{self.total} {run.name}: {status}{eta}")


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{max(minutes, 1)} min"


def _write_config(run: PlannedRun) -> Path:
    path = run.directory / "grid_run.yaml"
    run.directory.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, run.config.to_yaml())
    return path


def _record(run: PlannedRun, **values) -> None:
    path = run.directory / "compare_run.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(values)
    write_text_atomically(path, json.dumps(record, indent=2))


def train_and_evaluate(run: PlannedRun, launcher: list[str], start_model: str, keep_weights: bool) -> str:
    """One run's training (unless done) and evaluation; returns its status line. Raises
    KeyboardInterrupt when the run was stopped by a signal (the grid stops, resumable)."""
    config_path = _write_config(run)
    log = run.directory / "compare.log"
    launched = []
    if not run.trained:
        # The comparison generates once, in its own evaluation; the run's final evaluation need not.
        training = launch(
            [
                *launcher,
                str(ENTRY),
                "train",
                "--config",
                str(config_path),
                "--eval.generations",
                "0",
                "--eval.answer_samples",
                "0",
            ],
            log,
        )
        launched.append(training)
        if training.returncode == EXIT_PREEMPTED:
            raise KeyboardInterrupt
        if training.returncode != 0:
            return (
                f"FAILED: training exited {training.returncode} after {training.seconds:.0f} s"
                f"{_user_error(log)} (log: {log})"
            )
        _record(run, train_seconds=training.seconds, train_peak_rss_mb=training.peak_rss_mb)
    model = start_model if run.spec is None else str(run.directory / "final_model")
    evaluation = launch(
        [
            *launcher,
            str(ENTRY),
            "compare-eval",
            model,
            "--config",
            str(config_path),
            "--start-model",
            start_model,
            "--output",
            str(run.evaluation),
        ],
        log,
    )
    launched.append(evaluation)
    if evaluation.returncode != 0 or not run.evaluation.is_file():
        return f"FAILED: evaluation exited {evaluation.returncode}{_user_error(log)} (log: {log})"
    _record(run, eval_seconds=evaluation.seconds, eval_peak_rss_mb=evaluation.peak_rss_mb)
    if not keep_weights and run.spec is not None:
        for name in ("checkpoints", "final_model"):
            shutil.rmtree(run.directory / name, ignore_errors=True)
    return f"{'trained and evaluated' if len(launched) == 2 else 'evaluated'} in {sum(launch.seconds for launch in launched):.0f} s"


def _user_error(log: Path) -> str:
    """The run's own one-line message (plot_ds/errors.py), when it stopped on a user error."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if " error: " in line and "plot-" in line]
    return f": {lines[-1].strip()[:300]}" if lines else ""


def run_grid(
    grid: Grid,
    output: Path,
    launcher: list[str] | None = None,
    keep_weights: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, str]:
    """Train and evaluate every run of ``grid`` under ``output``; returns each run's status
    ("done", "skipped", or why it failed). A failed run is reported and the others go on."""
    launcher = launcher or [sys.executable]
    planned = plan(grid, output)
    start_model = grid.start_config().model.name_or_path
    progress = Progress(len(planned), say)
    statuses = {}
    for run in planned:
        if run.evaluation.is_file():
            statuses[run.name] = "skipped"
            progress.report(run, "already evaluated, skipped")
            continue
        started = time.perf_counter()
        status = train_and_evaluate(run, launcher, start_model, keep_weights)
        statuses[run.name] = "failed" if status.startswith("FAILED") else "done"
        # The starting model's evaluation alone says little about how long a training run takes.
        progress.report(run, status, time.perf_counter() - started if run.spec else 0.0)
    return statuses
