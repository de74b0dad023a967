"""Random number generator states: seeding a run, and every generator's state for exact resume."""

from __future__ import annotations

import random

import torch


def seed_everything(seed: int) -> None:
    import numpy

    random.seed(seed)
    torch.manual_seed(seed)
    numpy.random.seed(seed)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors: torch's and the accelerator's states, plain: Python's and NumPy's as JSON data)."""
    import numpy
    from deepspeed.accelerator import get_accelerator

    tensors = {"torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        tensors["accelerator"] = accelerator.get_rng_state()
    kind, keys, pos, has_gauss, cached = numpy.random.get_state()
    plain = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    import numpy
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(tensors["torch"])
    if "accelerator" in tensors and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(tensors["accelerator"])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))
