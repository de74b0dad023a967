"""Rows of a ZeRO-3-partitioned embedding matrix fetched from the ranks that own them: each rank
receives its own rows only, so its bytes do not grow with the number of ranks (``slice_cost``).

Frequent tokens are wanted by almost every rank, and a vocabulary ordered by frequency puts them on
the first owners, which would send R copies. A histogram of requests (the same on every rank) finds
those hot rows; they reach every rank in shares assembled from the owners' pieces and all-gathered.
"""

from __future__ import annotations

import torch

from .slice_cost import INDEX_BYTES, all_gather_received, all_reduce_received, histogram_element_size, hot_threshold
from .zero_layout import owned_rows, owners, partition_of


def request_histogram(weight: torch.Tensor, ids: torch.Tensor, device) -> tuple[torch.Tensor, int]:
    """How many ranks ask for each row ([V], the same on every rank), and its bytes."""
    import deepspeed.comm as dist

    group = weight.ds_process_group
    world = dist.get_world_size(group=group)
    element_size = histogram_element_size(world)
    requesters = torch.zeros(
        int(weight.ds_shape[0]), device=device, dtype=torch.uint8 if element_size == 1 else torch.int32
    )
    requesters[ids.to(device=device, dtype=torch.long)] = 1
    dist.all_reduce(requesters, group=group)
    return requesters, int(all_reduce_received(requesters.numel() * element_size, world))


def hot_threshold_of(weight: torch.Tensor, requesters: torch.Tensor) -> int:
    import deepspeed.comm as dist

    _, _, size = partition_of(weight)
    vocab, dim = (int(n) for n in weight.ds_shape)
    owner = torch.arange(vocab, device=requesters.device) * dim // size
    return hot_threshold(
        requesters.long(), owner, dist.get_world_size(group=weight.ds_process_group), dim * weight.element_size()
    )


def all_to_all_rows(
    weight: torch.Tensor, ids: torch.Tensor, device, requesters: torch.Tensor, threshold: int
) -> tuple[torch.Tensor, int]:
    """Rows E[ids] fetched from their owners: the rows at least ``threshold`` ranks ask for
    (``requesters``, the same on every rank) to every rank, the others by one all-to-all of ids to
    the owners and one of rows back. Every rank of the group calls, with any number of ids (also
    none). Returns (rows, bytes received after the histogram)."""
    import deepspeed.comm as dist

    group = weight.ds_process_group
    world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    partition, low, size = partition_of(weight)
    vocab, dim = (int(n) for n in weight.ds_shape)
    ids = ids.to(device=device, dtype=torch.long)
    row_bytes = dim * partition.element_size()
    moved = 0

    rows = torch.zeros(ids.numel(), dim, device=device, dtype=partition.dtype)
    is_hot = requesters[ids].long() >= threshold
    hot_ids = (requesters.long() >= threshold).nonzero().squeeze(-1)  # sorted, the same on every rank
    if hot_ids.numel():
        hot_block, hot_moved = rows_to_everyone(partition, low, size, (vocab, dim), hot_ids, group, device)
        moved += hot_moved
        at = torch.searchsorted(hot_ids, ids).clamp_max(hot_ids.numel() - 1)
        rows = torch.where(is_hot.unsqueeze(-1), hot_block[at], rows)

    # Each cold row is asked of every rank holding an element of it (more than one only where a
    # partition boundary cuts it); the owners' zero-filled pieces sum to the exact row.
    cold = (~is_hot).nonzero().squeeze(-1)
    slot, owner = owners(ids[cold], dim, size)
    request_slot = cold[slot]
    order = torch.argsort(owner, stable=True)
    request_slot, request_ids = request_slot[order], ids[request_slot[order]]
    send_counts = torch.bincount(owner, minlength=world)
    receive_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(receive_counts, send_counts, group=group)
    sends, receives = send_counts.tolist(), receive_counts.tolist()  # the one host sync: buffer sizes
    asked = request_ids.new_empty(sum(receives))
    dist.all_to_all_single(asked, request_ids, output_split_sizes=receives, input_split_sizes=sends, group=group)
    answer_block, _ = owned_rows(partition, low, size, (vocab, dim), asked, device)
    answers = answer_block.new_empty(request_ids.numel(), dim)
    dist.all_to_all_single(answers, answer_block, output_split_sizes=sends, input_split_sizes=receives, group=group)
    rows.index_add_(0, request_slot, answers)
    moved += (
        (world - 1) * INDEX_BYTES
        + (sum(receives) - receives[rank]) * INDEX_BYTES
        + (sum(sends) - sends[rank]) * row_bytes
    )
    return rows, int(moved)


def rows_to_everyone(
    partition: torch.Tensor, low: int, size: int, shape: tuple[int, int], row_ids: torch.Tensor, group, device
) -> tuple[torch.Tensor, int]:
    """Rows ``row_ids`` (sorted, the same on every rank) on every rank: each owner sends its pieces to
    the rank that assembles that share of the rows (an all-to-all; no ids travel, every rank knows who
    holds what), then one all-gather of the assembled shares. A rank receives about the rows once,
    where an all-reduce of owner-filled blocks would receive them twice. Returns (rows, bytes)."""
    import deepspeed.comm as dist

    world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    dim = shape[1]
    share = -(-row_ids.numel() // world)
    slot, owner = owners(row_ids, dim, size)
    # what this rank sends: its pieces, to the assembler of each row (sorted by it, as slots are)
    mine = slot[owner == rank]
    pieces, _ = owned_rows(partition, low, size, shape, row_ids[mine], device)
    sends = torch.bincount(mine // share, minlength=world).tolist()
    # what it receives: the pieces of its share of rows, from each owner in rank order
    in_share = (slot // share) == rank
    by_owner = torch.argsort(owner[in_share], stable=True)
    arriving_slot = slot[in_share][by_owner]
    receives = torch.bincount(owner[in_share], minlength=world).tolist()
    arrived = pieces.new_empty(arriving_slot.numel(), dim)
    dist.all_to_all_single(arrived, pieces, output_split_sizes=receives, input_split_sizes=sends, group=group)
    assembled = pieces.new_zeros(share, dim)
    assembled.index_add_(0, arriving_slot - rank * share, arrived)
    everyone = [torch.empty_like(assembled) for _ in range(world)]
    dist.all_gather(everyone, assembled, group=group)
    row_bytes = dim * partition.element_size()
    moved = (sum(receives) - receives[rank]) * row_bytes + all_gather_received(share * row_bytes, world)
    return torch.cat(everyone)[: row_ids.numel()], int(moved)
