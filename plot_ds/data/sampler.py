"""Which pairs each rank uses at each optimizer step."""

from __future__ import annotations

import torch

from .records import DataError


class GlobalBatchSampler:
    """Every epoch is a seeded permutation of all pairs cut into global batches of
    ``micro_batch_size * gradient_accumulation_steps * world_size`` pairs (the last one shorter);
    each global batch is dealt out in near-equal contiguous shares to the ranks, and each share
    into micro-batches. Every pair is used exactly once per epoch, and the global batch of a step
    does not depend on how it is split. The position is the step number: exact resume.
    """

    def __init__(
        self,
        num_pairs: int,
        micro_batch_size: int,
        gradient_accumulation_steps: int,
        rank: int,
        world_size: int,
        seed: int,
    ):
        if num_pairs < 1:
            raise DataError("no training pairs left to sample from")
        self.num_pairs = num_pairs
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch_size = micro_batch_size * gradient_accumulation_steps * world_size
        self.steps_per_epoch = -(-num_pairs // self.global_batch_size)
        self.last_batch_size = num_pairs - (self.steps_per_epoch - 1) * self.global_batch_size
        self._epoch, self._order = None, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(self.num_pairs, generator=generator).tolist()
            self._epoch = epoch
        return self._order

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches at ``step``; some may be empty in an epoch's last step."""
        batch = self.global_batch(step)
        base, extra = divmod(len(batch), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        mine = batch[start : start + base + (self.rank < extra)]
        m = self.micro_batch_size
        return [mine[i * m : (i + 1) * m] for i in range(self.gradient_accumulation_steps)]

    def state_dict(self, step: int) -> dict:
        return {
            "step": step,
            "epoch": self.epoch_of(step),
            "seed": self.seed,
            "num_pairs": self.num_pairs,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> int:
        """The step to continue from; refuses a position that belongs to other data or batching."""
        for key in ("seed", "num_pairs", "global_batch_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"cannot resume the data position: {key} was {state.get(key)} and is now "
                    f"{getattr(self, key)} (same data, seed and global batch needed)"
                )
        return int(state["step"])


def eval_shards(num_pairs: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's eval batches. Every rank gets the same number of batches, since a ZeRO-3
    forward is a collective; a rank with nothing left gets an empty batch (run as a weightless filler)."""
    mine = list(range(rank, num_pairs, world_size))
    per_rank = -(-num_pairs // world_size)
    count = -(-per_rank // batch_size)
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(count)]
