"""Rows E[U] of a ZeRO-3-partitioned embedding matrix, moving only the rows that are needed.

ZeRO-3 keeps each parameter as a flat, padded tensor cut into equal contiguous partitions, one per
rank (``param.ds_tensor``). To read rows U without materialising the V x d matrix:
1. ranks exchange their row-index sets (small: |U_r| integers each);
2. each rank writes, into a buffer of sum_r |U_r| rows, the elements of those rows that lie in its
   own partition (zeros elsewhere);
3. one all-reduce sums the buffers: every element has exactly one owner, so the sum is the row.
Communication is sum_r |U_r| x d elements, against V x d for a full gather. The full gather
(``deepspeed.zero.GatheredParameters``) stays available as the reference path.
"""
from __future__ import annotations

import torch


def is_partitioned(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_tensor") and hasattr(weight, "ds_shape")


def _full_rows(weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    if not is_partitioned(weight):
        return weight.detach()[ids.to(weight.device)], 0
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        rows = weight.detach()[ids.to(weight.device)].clone()
    return rows, weight.ds_numel * weight.element_size()


def _sliced_rows(weight: torch.Tensor, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    if not is_partitioned(weight):
        return weight.detach()[ids.to(weight.device)].to(device), 0
    import deepspeed.comm as dist

    group = weight.ds_process_group
    world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    dim = weight.ds_shape[-1]
    partition = weight.ds_tensor
    size = partition.ds_numel if hasattr(partition, "ds_numel") else partition.numel()

    ids = ids.to(device=device, dtype=torch.long)
    if world == 1:  # the one partition is the whole (padded) matrix
        matrix = partition.narrow(0, 0, weight.ds_numel).view(weight.ds_shape)
        return matrix[ids.to(partition.device)].to(device), 0
    count = torch.tensor([ids.numel()], device=device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = torch.cat(counts).tolist()  # one small host sync per micro-batch
    padded = torch.zeros(max(counts), device=device, dtype=torch.long)
    padded[:ids.numel()] = ids
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    requested = torch.cat([g[:n] for g, n in zip(gathered, counts)])

    low, high = rank * size, rank * size + size
    buffer = torch.zeros(requested.numel(), dim, device=device, dtype=weight.dtype)
    # Only rows overlapping [low, high) have elements here: index just those.
    touching = ((requested + 1) * dim > low) & (requested * dim < high)
    slots = touching.nonzero().squeeze(-1)
    if slots.numel():
        flat = requested[slots].unsqueeze(-1) * dim + torch.arange(dim, device=device)
        owned = (flat >= low) & (flat < high)
        values = partition[(flat[owned] - low).to(partition.device)].to(device)
        block = torch.zeros(slots.numel(), dim, device=device, dtype=weight.dtype)
        block[owned] = values
        buffer[slots] = block
    dist.all_reduce(buffer, group=group)
    start = sum(counts[:rank])
    # The all-reduced rows, plus the exchanged counts and padded index lists (int64).
    moved = buffer.numel() * buffer.element_size() + world * (1 + padded.numel()) * 8
    return buffer[start:start + ids.numel()], moved


class EmbeddingRows:
    """Detached rows of an embedding matrix (the OT geometry is a constant inside a step).

    ``path="slice"`` moves only the requested rows; ``path="full"`` gathers the whole matrix.
    Both return identical rows. Every rank of the parameter's group must call together.
    Returns (rows [n, d], bytes this rank's collectives moved).
    """

    def __init__(self, weight: torch.Tensor, path: str = "slice"):
        if path not in ("slice", "full"):
            raise ValueError(f"plot.embedding_gather: unknown path '{path}' (slice or full)")
        self.weight, self.path = weight, path

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.weight, "ds_shape", self.weight.shape)[0])

    @property
    def full_matrix_bytes(self) -> int:
        shape = getattr(self.weight, "ds_shape", self.weight.shape)
        return int(shape[0] * shape[1] * self.weight.element_size())

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
        if self.path == "full":
            rows, moved = _full_rows(self.weight, ids)
            return rows.to(device), moved
        return _sliced_rows(self.weight, ids, device)


def embedding_rows_for(model, plot_config) -> EmbeddingRows | None:
    """The rows provider for PLOT's ground cost, or None when PLOT is off. ``plot_config`` is the
    ``plot`` config section; ``embedding: output`` uses the LM head (untied models)."""
    if not (plot_config.enabled and plot_config.alpha > 0):
        return None
    layer = model.get_input_embeddings() if plot_config.embedding == "input" else model.get_output_embeddings()
    return EmbeddingRows(layer.weight, plot_config.embedding_gather)
