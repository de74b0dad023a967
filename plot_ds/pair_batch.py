"""The contract between data, forward, losses and the loop, at the bottom of the house (it imports
only torch): one micro-batch of pairs (``PairBatch``), the counts behind every global mean
(``PairCounts``), the whole global batch as the losses see it (``GlobalTotals``, ``GlobalPairs``),
what PLOT asks of the distributed world (``EmbeddingRowSource``), and a model's outputs on a batch
(``PairOutputs``: per-pair log-probs, the response positions, the logits or PLOT's supports)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Protocol

import torch

IGNORE_INDEX = -100  # labels of prompt and padding positions


@dataclass(frozen=True)
class PairCounts:
    """The denominators of the global means: of one micro-batch, or summed over a global batch
    (every micro-batch of every rank). A filler micro-batch counts one micro-batch and nothing else."""

    pairs: float = 0.0
    chosen_tokens: float = 0.0  # response tokens of the chosen rows
    rejected_tokens: float = 0.0
    input_tokens: float = 0.0  # every token the forward reads (prompts twice)
    micro_batches: float = 0.0

    def __add__(self, other: "PairCounts") -> "PairCounts":
        return PairCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_tensor(self, device=None) -> torch.Tensor:
        """float64, one entry per field (``names``): one all-reduce sums every count."""
        return torch.tensor([getattr(self, name) for name in self.names()], dtype=torch.float64, device=device)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def total(cls, counts) -> "PairCounts":
        return sum(counts, cls())


@dataclass
class PairBatch:
    """One collated micro-batch: the chosen rows of its pairs, then their rejected rows, right-padded,
    labels on response tokens only. A ``filler`` batch (a rank with no pair left in the short last
    global batch of an epoch) runs the forward and backward that ZeRO-3 needs of every rank, and
    counts nothing."""

    input_ids: torch.Tensor  # [2 * pairs, width]
    attention_mask: torch.Tensor  # [2 * pairs, width]
    labels: torch.Tensor  # [2 * pairs, width], IGNORE_INDEX off the responses
    pair_ids: list[str]  # empty for a filler
    counts: PairCounts
    filler: bool = False
    example_index: Optional[torch.Tensor] = None  # [pairs] each pair's index in its dataset
    # [2 * pairs, width]: where the rows are slices of longer ones (sequence parallelism), each
    # position's place in its whole row; None: 0, 1, ... as usual.
    position_ids: Optional[torch.Tensor] = None

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def weight(self) -> float:
        """What its loss and metrics count for: 0 for a filler, else 1."""
        return 0.0 if self.filler else 1.0


@dataclass
class GlobalPairs:
    """Per-pair log-probs of the whole global batch as one gathered table (detached), and where this
    micro-batch's pairs sit in it: for terms defined over the batch (AOT sorts its log-ratios)."""

    table: torch.Tensor  # [ranks * slots, len(COLUMNS)] float64
    positions: torch.Tensor  # [pairs of this micro-batch] long, -1 for a filler pair

    COLUMNS = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected", "dataset_index", "valid")

    def column(self, name: str) -> torch.Tensor:
        return self.table[:, self.COLUMNS.index(name)]

    @property
    def valid(self) -> torch.Tensor:
        return self.column("valid") > 0

    def sorted_and_ranks(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the valid entries of ``values`` sorted ascending, each table row's rank among them),
        ties in dataset order; invalid rows sort after every valid one."""
        big = torch.finfo(values.dtype).max
        keyed = torch.where(self.valid, values, torch.full_like(values, big))
        by_index = torch.where(self.valid, self.column("dataset_index"), torch.full_like(values, big)).argsort(
            stable=True
        )
        order = by_index[keyed[by_index].argsort(stable=True)]
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel(), device=order.device)
        return keyed[order], ranks

    def lookup(self, per_row: torch.Tensor) -> torch.Tensor:
        """``per_row`` (one value per table row) at this micro-batch's pairs (0 for fillers)."""
        return per_row[self.positions.clamp_min(0)]


@dataclass
class GlobalTotals:
    """The counts of the whole global batch of one optimizer step (float32 on the loss's device,
    identical on every rank): each loss and metric is a micro-batch's sum over one of them."""

    pairs: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    input_tokens: torch.Tensor
    micro_batches: torch.Tensor
    # The whole global batch's per-pair log-probs, for terms defined over the batch (AOT); set per
    # micro-batch (``with_batch``) when an objective term asks for it.
    batch: Optional[GlobalPairs] = None

    def with_batch(self, batch: GlobalPairs | None) -> "GlobalTotals":
        return replace(self, batch=batch)

    @classmethod
    def from_counts(cls, counts: PairCounts | torch.Tensor, device=None) -> "GlobalTotals":
        """From ``counts``, or from their tensor (``PairCounts.as_tensor``, summed over the ranks where
        it lies: read on its device, without a wait for the host)."""
        values = counts if isinstance(counts, torch.Tensor) else counts.as_tensor(device)
        return cls(**dict(zip(PairCounts.names(), values.to(torch.float32).unbind(), strict=True)))


@dataclass(frozen=True)
class ForwardNeeds:
    """What an objective reads of a micro-batch's forward beyond the policy's per-pair log-probs:
    declared by each loss term, combined by the objective, read by the one micro-batch function."""

    reference: bool = False  # the reference's per-pair log-probs
    reference_logits: bool = False  # the reference's [N, V] logits (PLOT's ref_mix target)
    policy_logits: bool = False  # the policy's [N, V] logits (PLOT over the whole vocabulary)
    top_k: int = 0  # PLOT's top-k supports, read in the policy's log-prob pass
    global_batch: bool = False  # the whole global batch's log-probs (AOT sorts them)

    def logps_only(self) -> "ForwardNeeds":
        """Log-probs of both sides and nothing more: a pass that only gathers the global table."""
        return ForwardNeeds(reference=self.reference, global_batch=self.global_batch)


class EmbeddingRowSource(Protocol):
    """Rows of the policy's embedding matrix E for token ids, wherever its shards live: all PLOT
    asks of the distributed world (``embedding_slice.EmbeddingRows`` under ZeRO-3). Each call
    returns its result and the bytes this rank received for it."""

    vocab_size: int
    last_path_code: float  # how the last call got its rows (embedding_slice.PATH_CODES)

    def __call__(self, ids: torch.Tensor, device) -> tuple[torch.Tensor, int]: ...

    def target_cosines(self, support: torch.Tensor, targets: torch.Tensor, device) -> tuple[torch.Tensor, int]: ...

    def unit_rows_at(self, ids: torch.Tensor, device) -> tuple[torch.Tensor, int]: ...


# ---------------------------------------------------------------- a model's outputs on a batch
@dataclass
class ResponseTokens:
    """The N response positions of a batch: ``logits[rows, cols]`` predicts ``targets``."""

    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    n_rows: int

    @classmethod
    def of(cls, labels: torch.Tensor) -> "ResponseTokens":
        """From labels (prompt and padding = IGNORE_INDEX). Works where the labels are: CPU labels
        give the positions without waiting for the device."""
        shifted = labels[:, 1:]
        rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        return cls(rows, cols, shifted[rows, cols], labels.shape[0])

    def select(self, per_position: torch.Tensor) -> torch.Tensor:
        """[rows, length, ...] -> [N, ...]: the entries at the response positions."""
        return per_position[self.rows, self.cols]

    def row_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per row, the sum of its positions' ``values``, in float64: a long response's log-prob is
        a sum of thousands of terms (float32 would keep ~1/64 of a nat at 16k tokens, and DPO takes
        differences of such sums), and under sequence parallelism partial sums of each rank's
        positions are added over the group, which must not change the result."""
        return values.new_zeros(self.n_rows, dtype=torch.float64).index_add(0, self.rows, values.double())

    def row_counts(self) -> torch.Tensor:
        return torch.zeros(self.n_rows, dtype=torch.long, device=self.rows.device).index_add(
            0, self.rows, torch.ones_like(self.rows)
        )


@dataclass
class SupportLogits:
    """Per response position: the ids of its ``k`` most likely tokens, then its target token, and
    their logits (float32, carrying gradient to the head): all PLOT reads of a top-k support."""

    ids: torch.Tensor  # [N, k + 1]
    logits: torch.Tensor  # [N, k + 1] float32


@dataclass
class PairLogps:
    """Summed response log-probs and response token counts of the pairs of a micro-batch."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def from_rows(cls, logps: torch.Tensor, tokens: torch.Tensor) -> "PairLogps":
        """Rows are chosen responses first, then rejected (see ``data.collate``)."""
        n = logps.shape[0] // 2
        return cls(logps[:n], logps[n:], tokens[:n], tokens[n:])


@dataclass
class PairOutputs:
    """A model's outputs on a collated batch: log-probs, and where a loss needs them the [N, V]
    logits at the response positions or each position's top-k ``SupportLogits``."""

    logps: PairLogps
    logits: torch.Tensor | None
    tokens: ResponseTokens
    support: SupportLogits | None = None
    # How much the pair-level terms of these log-probs count on this rank: under sequence
    # parallelism the ranks of a group hold the same summed log-probs and only the first counts
    # them (0 elsewhere; the gradient reaches every rank's positions through the sum's backward).
    pair_weight: float = 1.0
