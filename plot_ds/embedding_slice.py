"""What PLOT needs of a ZeRO-3-partitioned embedding matrix E, moving as little of it as possible.

ZeRO-3 keeps each parameter as a flat, padded tensor cut into equal contiguous partitions, one per
rank (``param.ds_tensor``). Every element has exactly one owner, so sums of owner-filled buffers
assemble exact values without materialising the V x d matrix:

- Rows E[U] (``EmbeddingRows.__call__``, for OT with a full cost matrix): ranks exchange their
  index sets, each writes the elements it owns into a buffer of sum_r |U_r| rows, one all-reduce
  completes them. sum_r |U_r| x d elements move, against V x d for a full gather.
- Cosines cos(E_i, E_y) to each position's target token (``target_cosines``, all that a point-mass
  target needs, the default): only the target rows E[Y] travel; each rank computes the partial
  dot products and squared norms over the elements it owns, and one all-reduce of those scalars
  completes them. sum_r |Y_r| x d elements plus a few numbers per (row, target) pair move.

The full gather (``deepspeed.zero.GatheredParameters``) stays available as the reference path
(``plot.embedding_gather: full``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def is_partitioned(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_tensor") and hasattr(weight, "ds_shape")


def _full_rows(weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    if not is_partitioned(weight):
        return weight.detach()[ids.to(weight.device)], 0
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        rows = weight.detach()[ids.to(weight.device)].clone()
    return rows, weight.ds_numel * weight.element_size()


def _partition(weight: torch.Tensor):
    """(this rank's flat partition, its first element in the flat padded matrix, its size)."""
    import deepspeed.comm as dist

    partition = weight.ds_tensor
    size = partition.ds_numel if hasattr(partition, "ds_numel") else partition.numel()
    rank = dist.get_rank(group=weight.ds_process_group)
    return partition, rank * size, size


def _all_gather_varying(values: torch.Tensor, group) -> tuple[list[torch.Tensor], int]:
    """Every rank's 1-D tensor (lengths may differ) and the bytes exchanged. One host sync: the
    lengths decide the buffers."""
    import deepspeed.comm as dist

    world = dist.get_world_size(group=group)
    count = torch.tensor([values.numel()], device=values.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = torch.cat(counts).tolist()
    padded = values.new_zeros(max(counts))
    padded[:values.numel()] = values
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    moved = world * (8 + padded.numel() * padded.element_size())
    return [g[:n] for g, n in zip(gathered, counts)], moved


def _owned_block(weight: torch.Tensor, row_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``row_ids`` with only this rank's elements filled (zeros elsewhere), and which of them
    have any element here. Every element of the matrix has exactly one owner."""
    partition, low, size = _partition(weight)
    return owned_rows(partition, low, size, tuple(weight.ds_shape), row_ids, device)


def owned_rows(partition: torch.Tensor, low: int, size: int, shape: tuple[int, int], row_ids: torch.Tensor,
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """``_owned_block`` for a partition holding the flat elements [low, low + size) of a row-major
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
        edge[first - row * dim:last - row * dim] = partition[first - low:last - low].to(device)
        at = row_ids == row
        block = torch.where(at.unsqueeze(-1), edge, block)
        touching |= at
    return block, touching


def _requested_rows(weight: torch.Tensor, ids: torch.Tensor, device) -> tuple[torch.Tensor, list[int], int]:
    """Rows requested by every rank, concatenated in rank order (each rank's own request sits at
    its offset), assembled by one all-reduce of owner-filled blocks."""
    import deepspeed.comm as dist

    group = weight.ds_process_group
    requests, moved = _all_gather_varying(ids, group)
    block, _ = _owned_block(weight, torch.cat(requests), device)
    dist.all_reduce(block, group=group)
    return block, [r.numel() for r in requests], moved + block.numel() * block.element_size()


def _whole_matrix_here(weight: torch.Tensor) -> torch.Tensor | None:
    """The V x d matrix, detached, when this rank holds all of it: unpartitioned (below ZeRO-3), or
    ZeRO-3's one partition on a single rank. None when it is spread over ranks."""
    if not is_partitioned(weight):
        return weight.detach()
    import deepspeed.comm as dist

    if dist.get_world_size(group=weight.ds_process_group) > 1:
        return None
    return weight.ds_tensor.narrow(0, 0, weight.ds_numel).view(weight.ds_shape)


def _sliced_rows(weight: torch.Tensor, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    matrix = _whole_matrix_here(weight)
    if matrix is not None:
        return matrix[ids.to(matrix.device)].to(device), 0
    import deepspeed.comm as dist

    ids = ids.to(device=device, dtype=torch.long)
    rows, counts, moved = _requested_rows(weight, ids, device)
    start = sum(counts[:dist.get_rank(group=weight.ds_process_group)])
    return rows[start:start + ids.numel()], moved


def _cosines_from_rows(rows_of, ids: torch.Tensor, targets: torch.Tensor, device) -> tuple[torch.Tensor, int]:
    """cos(E_i, E_{y_n}) for i in ids[n] from fetched rows (the unpartitioned / full-gather path)."""
    unique, inverse = torch.unique(torch.cat([ids.flatten(), targets]), return_inverse=True)
    rows, moved = rows_of(unique)
    unit = F.normalize(rows.float(), dim=-1)
    slots, target_slots = inverse[:ids.numel()].view_as(ids), inverse[ids.numel():]
    chunk = 256  # bounds the [chunk, K, d] gather
    cosine = torch.cat([torch.einsum("nkd,nd->nk", unit[slots[i:i + chunk]], unit[target_slots[i:i + chunk]])
                        for i in range(0, ids.shape[0], chunk)]) if ids.shape[0] else ids.new_zeros(ids.shape, dtype=torch.float32)
    return cosine, moved


def _cosines_in_place(matrix: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cos(E_i, E_{y_n}) for i in ids[n], read straight from a matrix on the compute device.

    No torch.unique (whose output size the host must wait for): rows are gathered per position, a
    bounded chunk of positions at a time, duplicates and all."""
    n, k = ids.shape
    chunk = max(1, (1 << 23) // max(1, k * matrix.shape[-1]))  # ~8M elements of [chunk, K, d] at a time
    parts = [torch.einsum("nkd,nd->nk", F.normalize(matrix[ids[i:i + chunk]].float(), dim=-1),
                          F.normalize(matrix[targets[i:i + chunk]].float(), dim=-1))
             for i in range(0, n, chunk)]
    return torch.cat(parts) if parts else ids.new_zeros(ids.shape, dtype=torch.float32)


def _sliced_cosines(weight: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, device) -> tuple[torch.Tensor, int]:
    """cos(E_i, E_{y_n}) for i in ids[n], moving partial dot products instead of rows.

    Only the target rows E[Y] travel (every rank gets all ranks' targets). Each rank then computes,
    for every rank's (i, y) pairs, the dot product over the elements of E_i it owns, and the same
    partial sums of squares for the norms; one all-reduce of these scalars completes them. Bytes:
    sum_r |Y_r| x d for the rows plus a few numbers per pair, against sum_r |U_r| x d rows.
    """
    import deepspeed.comm as dist

    group = weight.ds_process_group
    rank, vocab = dist.get_rank(group=group), weight.ds_shape[0]
    ids, targets = ids.to(device=device, dtype=torch.long), targets.to(device=device, dtype=torch.long)
    wanted_targets, target_index = torch.unique(targets, return_inverse=True)
    target_rows, target_counts, moved = _requested_rows(weight, wanted_targets, device)
    target_offsets = [sum(target_counts[:r]) for r in range(len(target_counts))]

    # This rank's distinct (row, target) pairs, as row * |Y_all| + (index of the target row).
    keys = ids * target_rows.shape[0] + (target_index + target_offsets[rank]).unsqueeze(-1)
    pair_keys, pair_of_entry = torch.unique(keys.flatten(), return_inverse=True)
    all_keys, key_moved = _all_gather_varying(pair_keys, group)
    moved += key_moved
    every_key = torch.cat(all_keys)
    pair_rows, pair_targets = every_key // target_rows.shape[0], every_key % target_rows.shape[0]

    rows, pair_slot = torch.unique(pair_rows, return_inverse=True)  # the same on every rank
    owned, touching = _owned_block(weight, rows, device)
    owned, targets_fp32 = owned.float(), target_rows.float()
    partial = torch.zeros(every_key.numel() + rows.numel(), device=device, dtype=torch.float32)
    here = touching[pair_slot].nonzero().squeeze(-1)  # pairs whose row has elements on this rank
    chunk = 4096
    for i in range(0, here.numel(), chunk):
        pairs = here[i:i + chunk]
        partial[pairs] = (owned[pair_slot[pairs]] * targets_fp32[pair_targets[pairs]]).sum(-1)
    partial[every_key.numel():] = owned.pow(2).sum(-1)
    dist.all_reduce(partial, group=group)
    moved += partial.numel() * partial.element_size()

    start = sum(k.numel() for k in all_keys[:rank])
    mine = slice(start, start + pair_keys.numel())
    dots = partial[mine]
    row_norms = partial[every_key.numel():].sqrt()[pair_slot[mine]]
    target_norms = targets_fp32.norm(dim=-1)[pair_targets[mine]]
    cosine = dots / (row_norms.clamp_min(1e-12) * target_norms.clamp_min(1e-12))
    return cosine[pair_of_entry].view_as(ids), moved


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

    def _matrix_on(self, device: torch.device) -> torch.Tensor | None:
        """The whole matrix when this rank holds it on ``device`` and the slice path may read it in
        place (an offloaded partition stays on the host: fetch its distinct rows instead)."""
        if self.path == "full" and is_partitioned(self.weight):
            return None
        matrix = _whole_matrix_here(self.weight)
        return matrix if matrix is not None and matrix.device == torch.device(device) else None

    @torch.no_grad()
    def unit_rows_at(self, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
        """L2-normalised float32 rows E[ids] for ids of any shape ([..., d]); bytes moved. Read in
        place where the matrix is here (no host sync); else its distinct rows are fetched once."""
        matrix = self._matrix_on(device)
        if matrix is not None:
            return F.normalize(matrix[ids].float(), dim=-1), 0
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows, moved = self(unique, device)
        return F.normalize(rows.float(), dim=-1)[inverse], moved

    @torch.no_grad()
    def target_cosines(self, ids: torch.Tensor, targets: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
        """cos(E_i, E_{targets[n]}) for every i in ids[n] ([N, K] -> [N, K] float32), all a point-mass
        target needs. Returns (cosines, bytes this rank's collectives moved)."""
        matrix = self._matrix_on(device)
        if matrix is not None:
            return _cosines_in_place(matrix, ids.to(device), targets.to(device)), 0
        if self.path == "slice" and _whole_matrix_here(self.weight) is None:  # spread over ranks
            return _sliced_cosines(self.weight, ids, targets, device)
        return _cosines_from_rows(lambda unique: self(unique, device), ids, targets, device)


def embedding_rows_for(model, plot_config) -> EmbeddingRows | None:
    """The rows provider for PLOT's ground cost, or None when PLOT is off. ``plot_config`` is the
    ``plot`` config section; ``embedding: output`` uses the LM head (untied models)."""
    if not plot_config.active:
        return None
    layer = model.get_input_embeddings() if plot_config.embedding == "input" else model.get_output_embeddings()
    return EmbeddingRows(layer.weight, plot_config.embedding_gather)
