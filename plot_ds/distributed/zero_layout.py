"""Where ZeRO-3 keeps each element of a partitioned parameter.

ZeRO-3 flattens a parameter, pads it to a multiple of the world size and cuts it into equal
contiguous partitions, one per rank of its group (``param.ds_tensor``). Every element has exactly one
owner, so sums of owner-filled buffers assemble exact values.
"""

from __future__ import annotations

import torch


def is_partitioned(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_tensor") and hasattr(weight, "ds_shape")


def partition_of(weight: torch.Tensor):
    """(this rank's flat partition, its first element in the flat padded matrix, its size)."""
    import deepspeed.comm as dist

    partition = weight.ds_tensor
    size = partition.ds_numel if hasattr(partition, "ds_numel") else partition.numel()
    rank = dist.get_rank(group=weight.ds_process_group)
    return partition, rank * size, size


def owned_rows(
    partition: torch.Tensor, low: int, size: int, shape: tuple[int, int], row_ids: torch.Tensor, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``row_ids`` with only this rank's elements filled (zeros elsewhere), and which of them have
    any element here, for a partition holding the flat elements [low, low + size) of a row-major
    [vocab, dim] matrix (the tail past vocab x dim is ZeRO-3's padding).

    A partition is one contiguous range: the rows it holds whole are a view of it, and at most two
    rows (its first and last) are cut by its ends. So the block is one row gather from that view plus
    two edge rows, never a mask over every element."""
    vocab, dim = shape
    end = min(low + size, vocab * dim)
    row_ids = row_ids.to(device)
    block = torch.zeros(row_ids.numel(), dim, device=device, dtype=partition.dtype)
    touching = torch.zeros(row_ids.numel(), dtype=torch.bool, device=device)
    if end <= low:
        return block, touching
    whole_first, whole_end = -(-low // dim), end // dim  # rows [whole_first, whole_end) lie here whole
    if whole_end > whole_first:
        whole = partition.narrow(0, whole_first * dim - low, (whole_end - whole_first) * dim).view(-1, dim)
        inside = (row_ids >= whole_first) & (row_ids < whole_end)
        local = (row_ids - whole_first).clamp(0, whole_end - whole_first - 1)
        block = torch.where(inside.unsqueeze(-1), whole[local.to(whole.device)].to(device), block)
        touching |= inside
    for row in sorted({low // dim, (end - 1) // dim} - set(range(whole_first, whole_end))):
        first, last = max(row * dim, low), min((row + 1) * dim, end)  # this row's elements held here
        edge = torch.zeros(dim, device=device, dtype=partition.dtype)
        edge[first - row * dim : last - row * dim] = partition[first - low : last - low].to(device)
        at = row_ids == row
        block = torch.where(at.unsqueeze(-1), edge, block)
        touching |= at
    return block, touching


def owners(row_ids: torch.Tensor, dim: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, owner rank) for every rank holding an element of each row, in row order; more than
    one owner only where a partition boundary cuts the row."""
    first = row_ids * dim // size
    count = ((row_ids + 1) * dim - 1) // size - first + 1
    slot = torch.repeat_interleave(torch.arange(row_ids.numel(), device=row_ids.device), count)
    start = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    return slot, first[slot] + torch.arange(slot.numel(), device=row_ids.device) - start
