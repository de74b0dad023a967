"""Saving training state: DeepSpeed engine state (partitioned model and optimizer) plus ours."""
from __future__ import annotations

from pathlib import Path


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(engine, output_dir: Path, step: int) -> Path:
    """Every rank writes its own partition; DeepSpeed moves the ``latest`` pointer afterwards."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    return root / tag
