"""The byte model of the embedding slice's paths (plot_ds/distributed/slice_cost.py), by hand computation. Its
agreement with the bytes real ranks count is tested in test_embedding_slice (and measured at 2, 4
and 8 ranks by bench/slice_scaling.py)."""

import pytest
import torch

from plot_ds.distributed.slice_cost import (
    SliceShape,
    all_gather_received,
    all_reduce_received,
    all_to_all_bytes,
    allreduce_rows_bytes,
    cheaper_path,
    full_gather_bytes,
    hot_rows_received,
    hot_threshold,
)


def test_ring_collectives_receive_what_a_ring_moves():
    assert all_reduce_received(1000, 1) == 0
    assert all_reduce_received(1000, 2) == 1000 and all_reduce_received(1000, 4) == 1500
    assert all_gather_received(10, 5) == 40
    # hot rows: a share of 3 rows assembled (2 of 3 of it from others on average) then all-gathered
    assert hot_rows_received(10, 4, 8) == pytest.approx(3 * 3 / 4 * 8 + 3 * 3 * 8)


def test_the_paths_by_hand():
    s = SliceShape(ranks=4, vocab=1000, dim=10, element_size=4, rows=100, remote=75)
    assert allreduce_rows_bytes(s) == 3 * (8 + 100 * 8) + 1.5 * (4 * 100 * 40)
    # histogram (uint8) + 3 split counts + every remote row's id received and the row itself
    assert all_to_all_bytes(s) == 1.5 * 1000 + 3 * 8 + 75 * (8 + 40)
    assert full_gather_bytes(s) == 3 * 2500 * 4


def test_the_cheaper_path_moves_from_allreduce_to_all_to_all_as_ranks_grow():
    shape = dict(vocab=128256, dim=4096, element_size=2, rows=3000, targets=150, pairs=15000)
    assert cheaper_path(SliceShape(ranks=2, **shape), cosines=True) == "allreduce"
    assert cheaper_path(SliceShape(ranks=512, **shape), cosines=True) == "all_to_all"
    # all_to_all is flat in R (but for the split counts); allreduce grows linearly
    small, large = (all_to_all_bytes(SliceShape(ranks=r, **shape)) for r in (64, 4096))
    assert large < 1.05 * small
    assert allreduce_rows_bytes(SliceShape(ranks=4096, **shape)) > 50 * allreduce_rows_bytes(
        SliceShape(ranks=64, **shape)
    )


def test_hot_rows_where_one_owner_would_send_many_copies_and_none_where_requests_spread():
    ranks, vocab = 8, 64
    owner = torch.arange(vocab) // 8
    crowded = torch.zeros(vocab, dtype=torch.long)
    crowded[:8] = ranks  # every rank wants all 8 rows of owner 0
    assert hot_threshold(crowded, owner, ranks, row_bytes=100) <= ranks
    spread = torch.zeros(vocab, dtype=torch.long)
    spread[::8] = 1  # one rank wants one row of each owner
    assert hot_threshold(spread, owner, ranks, row_bytes=100) == ranks + 1
