"""What a person watching the run sees: a progress bar and TensorBoard scalars, on rank 0 only.

Metric names follow TRL (``docs/monitoring.md``: ``rewards/margins``,
``logps/chosen``...). Values arrive already reduced over ranks (see ``reduce_metrics``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..distributed.process_group import all_reduce_sum


def reduce_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """One all-reduce for all metrics. Each value is a rank's share of a global mean (already
    divided by the global count), so the sum over ranks is the mean itself."""
    if not sums:
        return {}
    names = sorted(sums)
    stacked = torch.stack([sums[n].detach().to(torch.float64) for n in names])
    all_reduce_sum(stacked)
    return dict(zip(names, stacked.tolist()))


class RunMonitor:
    PROGRESS_FIELDS = {
        "loss/total": "loss",
        "rewards/accuracies": "acc",
        "lr": "lr",
        "throughput/tokens_per_s": "tok/s",
    }

    def __init__(self, log_dir: Path, total_steps: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.total_steps = total_steps
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
        from tqdm.auto import tqdm

        # A log file (Slurm, nohup) gets an ASCII bar: block characters split across the buffered
        # writes of several ranks sharing one file come out as invalid UTF-8.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            ascii=not interactive,
            mininterval=0.1 if interactive else 5.0,
        )
        self._tokens, self._pairs, self._steps, self._since = 0.0, 0.0, 0, time.perf_counter()

    def count(self, tokens: float, pairs: float) -> None:
        if self.enabled:
            self._tokens += tokens
            self._pairs += pairs
            self._steps += 1

    def throughput(self) -> dict[str, float]:
        """Tokens and pairs per second since the last call (all ranks' work, wall time on rank 0)."""
        now = time.perf_counter()
        seconds = max(now - self._since, 1e-9)
        rates = {
            "throughput/tokens_per_s": self._tokens / seconds,
            "throughput/pairs_per_s": self._pairs / seconds,
            "throughput/seconds_per_step": seconds / max(self._steps, 1),
        }
        self._tokens, self._pairs, self._steps, self._since = 0.0, 0.0, 0, now
        return rates

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
        shown = {label: f"{metrics[name]:.4g}" for name, label in self.PROGRESS_FIELDS.items() if name in metrics}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class StepLog:
    """A JSON-lines record per step that survives resumes: entries after the step a run resumes
    from are dropped (they will be redone), so the file always tells one consistent history."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True):
        self.path, self.handle = Path(path), None
        if not enabled:
            return
        kept = []
        if self.path.is_file() and resume_step > 0:
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
