"""The optimizer's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

from ..config import TrainConfig


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors, judged by their unpartitioned
    shape since ZeRO-3 leaves an empty placeholder behind)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(train: TrainConfig):
    """Multiplier of the peak lr at each optimizer step: linear warmup, cosine to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine

    return factor
