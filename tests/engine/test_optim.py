import math

import pytest

from plot_ds.config import TrainConfig
from plot_ds.engine.optim import warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    factor = warmup_cosine(TrainConfig(max_steps=10, warmup_steps=2, min_lr_ratio=0.1))
    values = [factor(s) for s in range(11)]
    assert values[0] == pytest.approx(1 / 3) and values[1] == pytest.approx(2 / 3)
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))
    assert values[10] == pytest.approx(0.1)


def test_the_decay_is_a_cosine_not_a_line():
    """Steps 2..10 decay over 8 steps: at a quarter of the way a cosine still holds 0.854 of the
    span above the floor (a linear decay 0.75), at three quarters 0.146 (a linear one 0.25)."""
    factor = warmup_cosine(TrainConfig(max_steps=10, warmup_steps=2, min_lr_ratio=0.1))
    assert factor(4) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, abs=1e-12)  # 0.868
    assert factor(8) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2, abs=1e-12)  # 0.232
    assert factor(6) == pytest.approx(0.55, abs=1e-12)
    # The steps shrink toward both ends of the decay: concave first, convex after the middle.
    drops = [factor(s) - factor(s + 1) for s in range(2, 10)]
    assert drops[0] < drops[1] < drops[2] < drops[3] and drops[4] > drops[5] > drops[6] > drops[7]
