import pytest

from plot_ds.config import TrainConfig
from plot_ds.optim import warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    factor = warmup_cosine(TrainConfig(max_steps=10, warmup_steps=2, min_lr_ratio=0.1))
    values = [factor(s) for s in range(11)]
    assert values[0] == pytest.approx(1 / 3) and values[1] == pytest.approx(2 / 3)
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))
    assert values[10] == pytest.approx(0.1)
