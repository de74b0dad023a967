"""The run: setup, the loop, evaluation, checkpoints and resume, the reference cache, export, monitoring, preemption."""
