"""One micro-batch, the one way: the reference's outputs, the policy's forward, and, given an
objective, its loss and metrics. Training (``loop.train_step``), evaluation, the global-batch
pre-pass and the reference cache all call ``forward_micro_batch``; ``micro_batch_results`` walks
one rank's share of a global batch (or of the held-out pairs) through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Union

import torch

from .global_batch import BatchTable, gather_batch_table
from ..pair_batch import PairOutputs
from ..pair_batch import ForwardNeeds, GlobalTotals, PairBatch
from .pair_forward import ForwardLayout, forward_pairs
from .reference import Reference


@dataclass
class PairModels:
    """The models a micro-batch runs through: the policy engine laid out as ``layout``, the
    reference (none when the objective needs none), and which split's pairs they see (a cached
    reference holds each split's log-probs)."""

    policy: object
    layout: ForwardLayout = ForwardLayout()
    reference: Reference | None = None
    split: str = "train"


@dataclass
class MicroBatchResult:
    policy: PairOutputs
    reference: PairOutputs | None
    loss: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


TotalsFor = Union[GlobalTotals, Callable[[PairOutputs, Union[PairOutputs, None]], GlobalTotals]]


def forward_micro_batch(
    models: PairModels,
    batch: PairBatch,
    needs: ForwardNeeds,
    objective=None,
    totals: TotalsFor | None = None,
    reference_out: PairOutputs | None = None,
) -> MicroBatchResult:
    """``batch`` through the reference (unless ``reference_out`` is given) and the policy, then, with
    an ``objective``, its loss and metrics over ``totals`` (or over what ``totals`` makes of the two
    outputs, for a global table gathered right after the forward). A filler batch's loss and metrics
    count zero: every rank runs it, nothing may count."""
    if reference_out is None and needs.reference and models.reference is not None:
        reference_out = models.reference.outputs(batch, needs.reference_logits, models.policy.device, models.split)
    policy_out = forward_pairs(models.policy, batch, needs.policy_logits, needs.top_k, models.layout)
    if objective is None:
        return MicroBatchResult(policy_out, reference_out)
    if callable(totals):
        totals = totals(policy_out, reference_out)
    loss, metrics = objective(policy_out, reference_out, totals)
    if batch.filler:
        loss = loss * batch.weight
        metrics = {name: value * batch.weight for name, value in metrics.items()}
    return MicroBatchResult(policy_out, reference_out, loss, metrics)


def table_owner(models: PairModels, rank: int) -> int:
    """The rank whose rows of the global table hold this rank's pairs: itself, or under sequence
    parallelism the first rank of its group (every rank of a group holds the same pairs)."""
    group = models.layout.sequence
    return rank if group is None else rank - group.index


@torch.no_grad()
def pre_pass(
    models: PairModels, batches: list[PairBatch], needs: ForwardNeeds, micro_size: int, rank: int
) -> tuple[BatchTable, list[PairOutputs | None]]:
    """A forward without gradients over every batch, for the global table before any loss: the
    later micro-batches of an accumulating step are not computed when the first one's loss is.
    Returns the table and the reference outputs (log-probs only: reusable unless the objective
    reads the reference's logits)."""
    results = [forward_micro_batch(models, batch, needs.logps_only()) for batch in batches]
    table = gather_batch_table(
        [
            (result.policy.logps, result.reference.logps if result.reference else None, batch)
            for result, batch in zip(results, batches)
        ],
        micro_size,
        rank,
        table_owner(models, rank),
    )
    return table, [None if needs.reference_logits else result.reference for result in results]


def micro_batch_results(
    models: PairModels, batches: list[PairBatch], objective, totals: GlobalTotals, micro_size: int, rank: int
) -> Iterator[MicroBatchResult]:
    """Each micro-batch's loss and metrics in turn (a training loop runs its backward before the
    next forward). A term over the global batch (``needs.global_batch``) gets the gathered table:
    from a pre-pass when this rank has several micro-batches, else right after the one forward."""
    needs = objective.needs
    table, references = None, [None] * len(batches)
    if needs.global_batch and len(batches) > 1:
        table, references = pre_pass(models, batches, needs, micro_size, rank)
    for index, batch in enumerate(batches):
        batch_totals: TotalsFor = totals
        if needs.global_batch and table is not None:
            batch_totals = totals.with_batch(table.for_micro_batch(index, batch))
        elif needs.global_batch:  # this rank's whole share is this one forward: gather right after it

            def batch_totals(policy_out, reference_out, batch=batch, index=index):
                gathered = gather_batch_table(
                    [(policy_out.logps, reference_out.logps if reference_out else None, batch)],
                    micro_size,
                    rank,
                    table_owner(models, rank),
                )
                return totals.with_batch(gathered.for_micro_batch(index, batch))

        yield forward_micro_batch(models, batch, needs, objective, batch_totals, references[index])
