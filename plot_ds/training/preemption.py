"""Stopping cleanly: SIGTERM, SIGUSR1 (Slurm's warning before the time limit) and Ctrl-C make every
rank finish its step, write a checkpoint and exit with EXIT_PREEMPTED, which job scripts read as
"requeue me" (launch/slurm.sh does). A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal

import torch

from ..distributed.process_group import all_reduce_sum

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later
EXIT_FAULTS = 3  # too many consecutive non-finite steps
WATCHED = ("SIGTERM", "SIGUSR1", "SIGINT")


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        for name in WATCHED:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        name = signal.Signals(number).name
        if name == "SIGINT" and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: no more waiting
        self.signal_name = self.signal_name or name

    def agreed(self, device) -> bool:
        """Whether any rank was asked to stop: one tiny all-reduce, the same answer everywhere,
        so that all ranks checkpoint together."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
