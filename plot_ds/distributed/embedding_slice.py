"""What PLOT needs of a ZeRO-3-partitioned embedding matrix E, moving as little of it as possible.

ZeRO-3 keeps each parameter as a flat, padded tensor cut into equal contiguous partitions, one per
rank (``param.ds_tensor``). Every element has exactly one owner, so sums of owner-filled buffers
assemble exact values without materialising the V x d matrix. Two ways to assemble what a
micro-batch needs (``slice_cost`` models both; ``plot.embedding_gather: slice`` picks the cheaper per
micro-batch, the same on every rank):

- ``allreduce``: ranks exchange their index sets and one all-reduce of owner-filled blocks completes
  every rank's rows at once. For the cosines cos(E_i, E_y) to each position's target token, all a
  point-mass target needs, only the target rows E[Y] travel so; then partial dot products and
  squared norms over the elements each rank owns, one all-reduce of scalars. The buffers hold every
  rank's requests, so they grow with the number of ranks.
- ``all_to_all``: each rank sends its row ids to the rows' owners and receives exactly its rows back
  (one variable-size all-to-all each way); a row a partition boundary cuts is asked of both owners
  and their zero-filled halves summed. A histogram of requests first finds the rows wanted by many
  ranks (frequent tokens crowd the low ids, i.e. one owner), which one all-reduce delivers instead.
  Bytes per rank do not grow with the number of ranks, but for R split counts.

The full gather (``deepspeed.zero.GatheredParameters``) stays available as the reference path
(``plot.embedding_gather: full``). Bytes are counted as received per rank (``slice_cost``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .rows_from_owners import all_to_all_rows, hot_threshold_of, request_histogram
from .slice_cost import INDEX_BYTES, SliceShape, all_gather_received, all_reduce_received, cheaper_path
from .zero_layout import is_partitioned, owned_rows, partition_of

PATHS = ("slice", "allreduce", "all_to_all", "full")
# plot/slice_path's values: how the last micro-batch's rows were obtained.
PATH_CODES = {"local": 0, "allreduce": 1, "all_to_all": 2, "full": 3}


def _full_rows(weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    if not is_partitioned(weight):
        return weight.detach()[ids.to(weight.device)], 0
    import deepspeed

    import deepspeed.comm as dist

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        rows = weight.detach()[ids.to(weight.device)].clone()
    _, _, size = partition_of(weight)
    return rows, all_gather_received(size * weight.element_size(), dist.get_world_size(group=weight.ds_process_group))


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
    padded[: values.numel()] = values
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    moved = all_gather_received(INDEX_BYTES + padded.numel() * padded.element_size(), world)
    return [g[:n] for g, n in zip(gathered, counts)], moved


def _owned_block(weight: torch.Tensor, row_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``row_ids`` with only this rank's elements filled (zeros elsewhere), and which of them
    have any element here. Every element of the matrix has exactly one owner."""
    partition, low, size = partition_of(weight)
    return owned_rows(partition, low, size, tuple(weight.ds_shape), row_ids, device)


def _requested_rows(weight: torch.Tensor, ids: torch.Tensor, device) -> tuple[torch.Tensor, list[int], int]:
    """Rows requested by every rank, concatenated in rank order (each rank's own request sits at
    its offset), assembled by one all-reduce of owner-filled blocks."""
    import deepspeed.comm as dist

    group = weight.ds_process_group
    requests, moved = _all_gather_varying(ids, group)
    block, _ = _owned_block(weight, torch.cat(requests), device)
    dist.all_reduce(block, group=group)
    moved += all_reduce_received(block.numel() * block.element_size(), len(requests))
    return block, [r.numel() for r in requests], moved


def _group_sums(values: list[int], weight: torch.Tensor, device) -> tuple[list[int], int]:
    """Sums over the parameter's group of a few per-rank sizes (one small all-reduce), and its bytes."""
    import deepspeed.comm as dist

    group = weight.ds_process_group
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(tensor, group=group)
    world = dist.get_world_size(group=group)
    return tensor.tolist(), int(all_reduce_received(tensor.numel() * INDEX_BYTES, world))


def _whole_matrix_here(weight: torch.Tensor) -> torch.Tensor | None:
    """The V x d matrix, detached, when this rank holds all of it: unpartitioned (below ZeRO-3), or
    ZeRO-3's one partition on a single rank. None when it is spread over ranks."""
    if not is_partitioned(weight):
        return weight.detach()
    import deepspeed.comm as dist

    if dist.get_world_size(group=weight.ds_process_group) > 1:
        return None
    return weight.ds_tensor.narrow(0, 0, weight.ds_numel).view(weight.ds_shape)


def _cosines_from_rows(rows_of, ids: torch.Tensor, targets: torch.Tensor, device) -> tuple[torch.Tensor, int]:
    """cos(E_i, E_{y_n}) for i in ids[n] from fetched rows (the unpartitioned / full-gather path)."""
    unique, inverse = torch.unique(torch.cat([ids.flatten(), targets]), return_inverse=True)
    rows, moved = rows_of(unique)
    unit = F.normalize(rows.float(), dim=-1)
    slots, target_slots = inverse[: ids.numel()].view_as(ids), inverse[ids.numel() :]
    chunk = 256  # bounds the [chunk, K, d] gather
    cosine = (
        torch.cat(
            [
                torch.einsum("nkd,nd->nk", unit[slots[i : i + chunk]], unit[target_slots[i : i + chunk]])
                for i in range(0, ids.shape[0], chunk)
            ]
        )
        if ids.shape[0]
        else ids.new_zeros(ids.shape, dtype=torch.float32)
    )
    return cosine, moved


def _cosines_in_place(matrix: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cos(E_i, E_{y_n}) for i in ids[n], read straight from a matrix on the compute device.

    No torch.unique (whose output size the host must wait for): rows are gathered per position, a
    bounded chunk of positions at a time, duplicates and all."""
    n, k = ids.shape
    chunk = max(1, (1 << 23) // max(1, k * matrix.shape[-1]))  # ~8M elements of [chunk, K, d] at a time
    parts = [
        torch.einsum(
            "nkd,nd->nk",
            F.normalize(matrix[ids[i : i + chunk]].float(), dim=-1),
            F.normalize(matrix[targets[i : i + chunk]].float(), dim=-1),
        )
        for i in range(0, n, chunk)
    ]
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
    rank = dist.get_rank(group=group)
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
        pairs = here[i : i + chunk]
        partial[pairs] = (owned[pair_slot[pairs]] * targets_fp32[pair_targets[pairs]]).sum(-1)
    partial[every_key.numel() :] = owned.pow(2).sum(-1)
    dist.all_reduce(partial, group=group)
    moved += all_reduce_received(partial.numel() * partial.element_size(), len(all_keys))

    start = sum(k.numel() for k in all_keys[:rank])
    mine = slice(start, start + pair_keys.numel())
    dots = partial[mine]
    row_norms = partial[every_key.numel() :].sqrt()[pair_slot[mine]]
    target_norms = targets_fp32.norm(dim=-1)[pair_targets[mine]]
    cosine = dots / (row_norms.clamp_min(1e-12) * target_norms.clamp_min(1e-12))
    return cosine[pair_of_entry].view_as(ids), moved


class EmbeddingRows:
    """Detached rows of an embedding matrix (the OT geometry is a constant inside a step).

    ``path``: ``slice`` (the cheaper of ``allreduce`` and ``all_to_all`` by ``slice_cost``, per
    micro-batch), one of those two forced, or ``full`` (gather the whole matrix). All return identical
    rows. Every rank of the parameter's group must call together. Calls return (values, bytes this
    rank received); ``last_path`` says how the last call got its rows (a key of ``PATH_CODES``).
    """

    def __init__(self, weight: torch.Tensor, path: str = "slice"):
        if path not in PATHS:
            raise ValueError(f"plot.embedding_gather: unknown path '{path}' ({', '.join(PATHS)})")
        self.weight, self.path, self._last_path = weight, path, "local"
        self._announced: set[str] = set()

    @property
    def last_path(self) -> str:
        return self._last_path

    @last_path.setter
    def last_path(self, path: str) -> None:
        """Also one line on rank 0 the first time each way of fetching rows is taken (the choice
        depends on the world size and the batch; the metric plot/slice_path records it per step)."""
        self._last_path = path
        if path == "local" or path in self._announced:
            return
        self._announced.add(path)
        from .process_group import rank

        if rank() == 0:
            print(f"[plot_ds] embedding slice: {path} (plot.embedding_gather: {self.path}; docs/method.md)", flush=True)

    @property
    def last_path_code(self) -> float:
        return float(PATH_CODES[self._last_path])

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.weight, "ds_shape", self.weight.shape)[0])

    @property
    def full_matrix_bytes(self) -> int:
        shape = getattr(self.weight, "ds_shape", self.weight.shape)
        return int(shape[0] * shape[1] * self.weight.element_size())

    def _spread(self) -> bool:
        return _whole_matrix_here(self.weight) is None

    def _shape(self, sums: list[int]) -> SliceShape:
        import deepspeed.comm as dist

        world = dist.get_world_size(group=self.weight.ds_process_group)
        vocab, dim = (int(n) for n in self.weight.ds_shape)
        rows, targets, pairs, remote = (total / world for total in sums)
        return SliceShape(world, vocab, dim, self.weight.element_size(), rows, targets, pairs, remote=remote)

    def _sizes(self, needed: torch.Tensor, targets: int = 0, pairs: int = 0) -> list[int]:
        """What the cost model needs of this rank: its distinct rows, targets and pairs, and how many
        of its rows it does not hold whole."""
        if self.path != "slice":
            return []
        _, low, size = partition_of(self.weight)
        dim = int(self.weight.ds_shape[1])
        whole_here = ((needed * dim >= low) & ((needed + 1) * dim <= low + size)).sum()
        return [needed.numel(), targets, pairs, needed.numel() - int(whole_here)]

    def _fetch_rows(self, ids: torch.Tensor, sizes: list[int], cosines: bool, device):
        """(how the rows of ``ids`` (distinct) come: "allreduce", or ("all_to_all", rows), bytes so
        far). ``slice`` first agrees on the sizes; where even the all-to-all's lower bound loses, it
        is the all-reduce, else the histogram gives the hot rows and the exact figure decides."""
        moved, shape = 0, None
        if self.path == "slice":
            sums, moved = _group_sums(sizes, self.weight, device)
            shape = self._shape(sums)
            if cheaper_path(shape, cosines) == "allreduce":
                return "allreduce", moved
        if self.path == "allreduce":
            return "allreduce", moved
        requesters, counted = request_histogram(self.weight, ids, device)
        moved += counted
        threshold = hot_threshold_of(self.weight, requesters)
        if shape is not None:
            hot = requesters.long() >= threshold
            shape = replace(
                shape, hot_rows=float(hot.sum()), hot_wanted=float(requesters.long()[hot].sum()) / shape.ranks
            )
            if cheaper_path(shape, cosines, histogram_paid=True) == "allreduce":
                return "allreduce", moved
        rows, fetched = all_to_all_rows(self.weight, ids, device, requesters, threshold)
        return ("all_to_all", rows), moved + fetched

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
        if self.path == "full":
            rows, moved = _full_rows(self.weight, ids)
            self.last_path = "full" if moved else "local"
            return rows.to(device), moved
        matrix = _whole_matrix_here(self.weight)
        if matrix is not None:
            self.last_path = "local"
            return matrix[ids.to(matrix.device)].to(device), 0
        import deepspeed.comm as dist

        ids = ids.to(device=device, dtype=torch.long)
        unique, inverse = torch.unique(ids, return_inverse=True)
        how, moved = self._fetch_rows(unique, self._sizes(unique), False, device)
        if how != "allreduce":
            self.last_path = "all_to_all"
            return how[1][inverse], moved
        self.last_path = "allreduce"
        rows, rows_per_rank, fetched = _requested_rows(self.weight, ids, device)
        start = sum(rows_per_rank[: dist.get_rank(group=self.weight.ds_process_group)])
        return rows[start : start + ids.numel()], moved + fetched

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
            self.last_path = "local"
            return F.normalize(matrix[ids].float(), dim=-1), 0
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows, moved = self(unique, device)
        return F.normalize(rows.float(), dim=-1)[inverse], moved

    @torch.no_grad()
    def target_cosines(
        self, ids: torch.Tensor, targets: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """cos(E_i, E_{targets[n]}) for every i in ids[n] ([N, K] -> [N, K] float32), all a point-mass
        target needs. Returns (cosines, bytes this rank's collectives moved)."""
        matrix = self._matrix_on(device)
        if matrix is not None:
            self.last_path = "local"
            return _cosines_in_place(matrix, ids.to(device), targets.to(device)), 0
        if self.path == "full" or not self._spread():
            return _cosines_from_rows(lambda unique: self(unique, device), ids, targets, device)
        ids, targets = ids.to(device=device, dtype=torch.long), targets.to(device=device, dtype=torch.long)
        needed = torch.unique(torch.cat([ids.flatten(), targets]))
        sizes = []
        if self.path == "slice":
            keys = ids * self.vocab_size + targets.unsqueeze(-1)
            sizes = self._sizes(needed, torch.unique(targets).numel(), torch.unique(keys).numel())
        how, moved = self._fetch_rows(needed, sizes, True, device)
        if how == "allreduce":
            self.last_path = "allreduce"
            cosine, fetched = _sliced_cosines(self.weight, ids, targets, device)
            return cosine, moved + fetched
        self.last_path = "all_to_all"
        rows = how[1]
        cosine, _ = _cosines_from_rows(lambda unique: (rows, 0), ids, targets, device)
        return cosine, moved


def embedding_rows_for(model, plot_config) -> EmbeddingRows | None:
    """The rows provider for PLOT's ground cost, or None when PLOT is off. ``plot_config`` is the
    ``plot`` config section; ``embedding: output`` uses the LM head (untied models)."""
    if not plot_config.active:
        return None
    layer = model.get_input_embeddings() if plot_config.embedding == "input" else model.get_output_embeddings()
    return EmbeddingRows(layer.weight, plot_config.embedding_gather)
