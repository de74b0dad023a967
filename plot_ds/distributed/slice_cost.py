"""What each way of assembling PLOT's embedding slice costs one rank, as a function of the world size.

The unit is bytes received per rank per micro-batch (every link receives at once, so the busiest
receiver sets the time), with the collectives as NCCL and gloo run them for large messages: an
all-reduce of n bytes receives 2 (R - 1) / R x n, an all-gather of n bytes per rank (R - 1) x n, an
all-to-all what is addressed to the rank. ``embedding_slice`` counts the same way, so the model and
the counted bytes can be compared (``bench/slice_scaling.py``). At run time every rank feeds the model
the same global sizes, so every rank picks the same path.

Paths (``plot.embedding_gather``):
- ``allreduce``: every rank's requests assembled in one buffer by an all-reduce of owner-filled
  blocks (for cosines: the target rows, then partial dot products per (row, target) pair). Cheap at a
  few ranks, but the buffer holds every rank's requests: it grows with R.
- ``all_to_all``: each row fetched from the rank that owns it, so a rank receives its own rows only.
  A histogram of requests (V counts) finds the rows many ranks want (frequent tokens, which a
  vocabulary sorted by frequency puts on one owner); those are assembled in shares and all-gathered
  so that no owner sends R copies. Constant in R but for the split counts (R integers).
- ``full``: the whole matrix gathered (``deepspeed.zero.GatheredParameters``).
"""

from __future__ import annotations

from dataclasses import dataclass

INDEX_BYTES = 8  # int64 token ids, counts and pair keys
SCALAR_BYTES = 4  # float32 partial dot products and squared norms


def all_reduce_received(nbytes: float, ranks: int) -> float:
    return 2 * (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def all_gather_received(nbytes_per_rank: float, ranks: int) -> float:
    return (ranks - 1) * nbytes_per_rank


def histogram_element_size(ranks: int) -> int:
    """Bytes per count of the request histogram: uint8 while a count fits (NCCL and gloo have no
    16-bit integer all-reduce), int32 beyond."""
    return 1 if ranks <= 255 else 4


@dataclass(frozen=True)
class SliceShape:
    """One micro-batch's sizes, per rank (means over ranks), and the matrix's."""

    ranks: int
    vocab: int
    dim: int
    element_size: int  # bytes per element of E (4 float32, 2 bf16)
    rows: float  # distinct rows a rank needs: U (rows) or U with Y (cosines)
    targets: float = 0.0  # distinct target tokens Y (cosines only)
    pairs: float = 0.0  # distinct (row, target) pairs (cosines only)
    hot_rows: float = 0.0  # rows the all-to-all path sends to every rank by one all-reduce
    hot_wanted: float = 0.0  # how many of a rank's rows are among them
    remote: float | None = None  # how many of a rank's rows live (partly) elsewhere; None: (R - 1) / R

    @property
    def remote_rows(self) -> float:
        return self.rows * (self.ranks - 1) / self.ranks if self.remote is None else self.remote

    @property
    def row_bytes(self) -> int:
        return self.dim * self.element_size


def allreduce_rows_bytes(s: SliceShape) -> float:
    """Rows by the all-reduce path: the index lists all-gathered, every rank's rows all-reduced."""
    return all_gather_received(INDEX_BYTES + s.rows * INDEX_BYTES, s.ranks) + all_reduce_received(
        s.ranks * s.rows * s.row_bytes, s.ranks
    )


def allreduce_cosines_bytes(s: SliceShape) -> float:
    """Cosines by partial dot products: every rank's target rows all-reduced, the pair keys all-gathered,
    then one all-reduce of a partial dot product per pair of every rank and a partial squared norm per
    distinct row (at most V)."""
    norms = min(s.vocab, s.ranks * s.rows)
    return (
        all_gather_received(INDEX_BYTES + s.targets * INDEX_BYTES, s.ranks)
        + all_reduce_received(s.ranks * s.targets * s.row_bytes, s.ranks)
        + all_gather_received(INDEX_BYTES + s.pairs * INDEX_BYTES, s.ranks)
        + all_reduce_received((s.ranks * s.pairs + norms) * SCALAR_BYTES, s.ranks)
    )


def hot_rows_received(hot_rows: float, ranks: int, row_bytes: int) -> float:
    """Rows every rank gets: its share assembled from the owners' pieces (an all-to-all), then the
    shares all-gathered: about the rows once (an all-reduce would receive them twice)."""
    if ranks <= 1 or not hot_rows:
        return 0.0
    share = -(-int(hot_rows) // ranks)
    return share * (ranks - 1) / ranks * row_bytes + all_gather_received(share * row_bytes, ranks)


def histogram_bytes(s: SliceShape) -> float:
    return all_reduce_received(s.vocab * histogram_element_size(s.ranks), s.ranks)


def all_to_all_bytes(s: SliceShape) -> float:
    """The request histogram all-reduced, the hot rows to every rank, then per other row living elsewhere
    (``remote_rows``, hot ones taken out in proportion) its id received by the owner and the row
    received back, plus the split counts exchanged with every other rank. Cut rows (two per
    partition boundary at most) are counted once."""
    cold = s.remote_rows * (max(s.rows - s.hot_wanted, 0.0) / s.rows if s.rows else 0.0)
    return (
        histogram_bytes(s)
        + hot_rows_received(s.hot_rows, s.ranks, s.row_bytes)
        + (s.ranks - 1) * INDEX_BYTES
        + cold * (INDEX_BYTES + s.row_bytes)
    )


def full_gather_bytes(s: SliceShape) -> float:
    """ZeRO-3's all-gather of the padded, equally partitioned matrix."""
    partition = -(-s.vocab * s.dim // s.ranks)
    return all_gather_received(partition * s.element_size, s.ranks)


def path_bytes(s: SliceShape, path: str, cosines: bool) -> float:
    if path == "allreduce":
        return allreduce_cosines_bytes(s) if cosines else allreduce_rows_bytes(s)
    if path == "all_to_all":
        return all_to_all_bytes(s)
    if path == "full":
        return full_gather_bytes(s)
    raise ValueError(f"unknown slice path {path!r}")


def cheaper_path(s: SliceShape, cosines: bool, histogram_paid: bool = False) -> str:
    """allreduce or all_to_all, whichever the model says receives fewer bytes (allreduce on a tie).
    ``histogram_paid``: the request histogram was already exchanged (to learn the hot rows), so it no
    longer counts against the all-to-all. Without hot rows (``hot_rows = 0``) the all-to-all's figure
    is a lower bound: hot rows only trade received bytes for owners that do not send R copies."""
    all_to_all = all_to_all_bytes(s) - (histogram_bytes(s) if histogram_paid else 0.0)
    return "all_to_all" if all_to_all < path_bytes(s, "allreduce", cosines) else "allreduce"


def hot_threshold(requesters, owner_of_row, ranks: int, row_bytes: int) -> int:
    """The fewest requesting ranks that make a row hot (sent to every rank, ``hot_rows_received``,
    instead of by its owner to each requester); ``ranks + 1`` for none.

    ``requesters[i]``: how many ranks asked for row i (the same histogram on every rank, so every rank
    picks the same threshold); ``owner_of_row[i]``: the rank holding row i. For each candidate the time
    is set by the busiest link: what a rank receives (the hot rows and, on average, its
    other rows held elsewhere) or what the busiest owner sends; the cheapest wins. Tensors of V.
    """
    import torch

    candidates, h = [], 2
    while h <= ranks:
        candidates.append(h)
        h *= 2
    candidates.append(ranks + 1)
    asked = requesters > 0
    best, best_cost = ranks + 1, None
    for h in sorted(set(candidates), reverse=True):  # on a tie the fewer hot rows
        cold = asked & (requesters < h)
        cold_requests = (requesters * cold).to(torch.float64)
        sends = torch.zeros(ranks, dtype=torch.float64, device=requesters.device)
        sends.index_add_(0, owner_of_row, cold_requests)
        hot = float((asked & ~cold).sum())
        received = (
            hot_rows_received(hot, ranks, row_bytes)
            + float(cold_requests.sum()) / ranks * (ranks - 1) / ranks * row_bytes
        )
        cost = max(received, float(sends.max()) * row_bytes)
        if best_cost is None or cost < best_cost:
            best, best_cost = h, cost
    return best
