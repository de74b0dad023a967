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

from .logprobs import PairLogps
from .pair_forward import forward_pairs, reference_pairs

COLUMNS = 6  # policy chosen, policy rejected, reference chosen, reference rejected, dataset index, valid


@dataclass
class GlobalPairs:
    """The gathered table, detached, and this micro-batch's rows in it."""
    table: torch.Tensor      # [ranks * slots, COLUMNS] float64
    positions: torch.Tensor  # [pairs of this micro-batch] long, -1 for a filler pair

    def at(self, positions: torch.Tensor) -> "GlobalPairs":
        return GlobalPairs(self.table, positions)

    @property
    def valid(self) -> torch.Tensor:
        return self.table[:, 5] > 0

    def column(self, index: int) -> torch.Tensor:
        return self.table[:, index]

    def sorted_and_ranks(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the valid entries of ``values`` sorted ascending, each table row's rank among them),
        ties in dataset order; invalid rows sort after every valid one."""
        big = torch.finfo(values.dtype).max
        keyed = torch.where(self.valid, values, torch.full_like(values, big))
        by_index = torch.where(self.valid, self.column(4), torch.full_like(values, big)).argsort(stable=True)
        order = by_index[keyed[by_index].argsort(stable=True)]
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel(), device=order.device)
        return keyed[order], ranks

    def lookup(self, per_row: torch.Tensor) -> torch.Tensor:
        """``per_row`` (one value per table row) at this micro-batch's pairs (0 for fillers)."""
        return per_row[self.positions.clamp_min(0)]


def table_rows(policy: PairLogps, reference: PairLogps | None, example_index: torch.Tensor,
               weight: float, slots: int) -> torch.Tensor:
    """One micro-batch's rows of its rank's table, padded to ``slots`` invalid rows."""
    pairs = policy.chosen.shape[0]
    rows = policy.chosen.new_zeros(slots, COLUMNS, dtype=torch.float64)
    rows[:pairs, 0], rows[:pairs, 1] = policy.chosen.detach().double(), policy.rejected.detach().double()
    if reference is not None:
        rows[:pairs, 2], rows[:pairs, 3] = reference.chosen.detach().double(), reference.rejected.detach().double()
    rows[:pairs, 4] = example_index.to(rows.device, torch.float64)
    rows[:pairs, 5] = float(weight > 0)
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


def micro_batch_positions(rank: int, slots_per_rank: int, micro_batch: int, micro_size: int, pairs: int,
                          weight: float, device) -> torch.Tensor:
    """The table rows of micro-batch ``micro_batch`` (``pairs`` pairs) of ``rank``."""
    if weight == 0:
        return torch.full((pairs,), -1, dtype=torch.long, device=device)
    start = rank * slots_per_rank + micro_batch * micro_size
    return torch.arange(start, start + pairs, device=device)


@dataclass
class BatchTable:
    """The gathered table of one step (or one evaluation), and how to find a micro-batch's rows."""
    table: torch.Tensor
    rank: int
    micro_size: int      # slots per micro-batch
    slots_per_rank: int

    def for_micro_batch(self, index: int, batch: dict) -> GlobalPairs:
        pairs = batch["input_ids"].shape[0] // 2
        return GlobalPairs(self.table, micro_batch_positions(self.rank, self.slots_per_rank, index, self.micro_size,
                                                             pairs, batch["weight"], self.table.device))


def gather_batch_table(logps: list[tuple[PairLogps, PairLogps | None, dict]], micro_size: int,
                       rank: int) -> BatchTable:
    """The global table from this rank's micro-batches, in order: (policy, reference log-probs,
    the collated batch with its ``example_index``) each."""
    rows = [table_rows(policy, reference, batch["example_index"], batch["weight"], micro_size)
            for policy, reference, batch in logps]
    return BatchTable(gather_table(rows), rank, micro_size, micro_size * len(rows))


@torch.no_grad()
def pre_pass(run, batches: list[dict], micro_size: int, keep_reference: bool):
    """A forward without gradients over every batch, for the global table before any loss: the
    later micro-batches of an accumulating step are not computed when the first one's loss is.
    Returns the table and the reference outputs (reusable when ``keep_reference``, else None)."""
    logps, references = [], []
    for batch in batches:
        reference = reference_pairs(run.reference, batch, False, run.policy.device, run.reference_layout)
        policy = forward_pairs(run.policy, batch, keep_logits=False, layout=run.policy_layout)
        logps.append((policy.logps, reference.logps if reference is not None else None, batch))
        references.append(reference if keep_reference else None)
    return gather_batch_table(logps, micro_size, run.dist.rank), references
