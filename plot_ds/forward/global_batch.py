"""Per-pair log-probs of the whole global batch (every micro-batch of every rank), for objectives
defined over the batch rather than per pair: AOT sorts the batch's log-ratios.

Each rank contributes one fixed-size table of its pairs (a slot per pair of its share; empty slots
and filler micro-batches marked invalid), gathered once per step: every rank then holds the same
global table, and a micro-batch knows where its own pairs sit in it. Ties in a sort are broken by
the pair's index in the dataset, so ranks (and gradients) do not depend on how the batch is split.
The table holds the global batch's pairs, six numbers each, whatever the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pair_batch import PairLogps
from ..pair_batch import GlobalPairs, PairBatch


def table_rows(
    policy: PairLogps, reference: PairLogps | None, example_index: torch.Tensor, filler: bool, slots: int
) -> torch.Tensor:
    """One micro-batch's rows of its rank's table (its pairs' indices in the dataset; a filler's
    rows, or another rank's copy of them, invalid), padded to ``slots`` invalid rows."""
    pairs, column = policy.chosen.shape[0], GlobalPairs.COLUMNS.index
    rows = policy.chosen.new_zeros(slots, len(GlobalPairs.COLUMNS), dtype=torch.float64)
    rows[:pairs, column("policy_chosen")] = policy.chosen.detach().double()
    rows[:pairs, column("policy_rejected")] = policy.rejected.detach().double()
    if reference is not None:
        rows[:pairs, column("reference_chosen")] = reference.chosen.detach().double()
        rows[:pairs, column("reference_rejected")] = reference.rejected.detach().double()
    rows[:pairs, column("dataset_index")] = example_index.to(rows.device, torch.float64)
    rows[:pairs, column("valid")] = float(not filler)
    return rows


def gather_table(rows: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's micro-batch rows, in rank order: one all-gather."""
    import deepspeed.comm as dist

    local = torch.cat(rows)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def micro_batch_positions(
    rank: int, slots_per_rank: int, micro_batch: int, micro_size: int, pairs: int, filler: bool, device
) -> torch.Tensor:
    """The table rows of micro-batch ``micro_batch`` (``pairs`` pairs) of ``rank``."""
    if filler:
        return torch.full((pairs,), -1, dtype=torch.long, device=device)
    start = rank * slots_per_rank + micro_batch * micro_size
    return torch.arange(start, start + pairs, device=device)


@dataclass
class BatchTable:
    """The gathered table of one step (or one evaluation), and how to find a micro-batch's rows."""

    table: torch.Tensor
    rank: int
    micro_size: int  # slots per micro-batch
    slots_per_rank: int

    def for_micro_batch(self, index: int, batch: PairBatch) -> GlobalPairs:
        return GlobalPairs(
            self.table,
            micro_batch_positions(
                self.rank, self.slots_per_rank, index, self.micro_size, batch.pairs, batch.filler, self.table.device
            ),
        )


def gather_batch_table(
    logps: list[tuple[PairLogps, PairLogps | None, PairBatch]], micro_size: int, rank: int, owner: int | None = None
) -> BatchTable:
    """The global table from this rank's micro-batches, in order: (policy, reference log-probs,
    the batch) each. ``owner``: the rank whose rows hold this rank's pairs (under sequence
    parallelism the first rank of its group; this rank's own copy is then marked invalid)."""
    owner = rank if owner is None else owner
    rows = [
        table_rows(policy, reference, batch.example_index, batch.filler or owner != rank, micro_size)
        for policy, reference, batch in logps
    ]
    return BatchTable(gather_table(rows), owner, micro_size, micro_size * len(rows))
