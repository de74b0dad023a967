"""The embedding-slice arithmetic that needs no ranks: owner-filled rows of ZeRO-3's flat partitions.
(Rows and cosines fetched across real ranks are tested in test_training_distributed.)"""
import pytest
import torch

from plot_ds.embedding_slice import owned_rows


def flat_partitions(matrix: torch.Tensor, ranks: int) -> list[tuple[torch.Tensor, int, int]]:
    """ZeRO-3's layout: the flattened matrix padded to a multiple of ``ranks``, cut into equal
    contiguous partitions; (partition, first element, size) per rank."""
    flat = matrix.flatten()
    size = -(-flat.numel() // ranks)
    padded = torch.cat([flat, torch.full((size * ranks - flat.numel(),), float("nan"))])
    return [(padded[r * size:(r + 1) * size].clone(), r * size, size) for r in range(ranks)]


@pytest.mark.parametrize("vocab,dim,ranks", [(7, 5, 3), (8, 4, 2), (3, 16, 5), (11, 3, 4), (2, 2, 7)])
def test_owned_rows_sum_to_the_rows_and_touch_only_owned_elements(vocab, dim, ranks):
    # Partition ends inside rows, on row boundaries, partitions smaller than a row, padding.
    matrix = torch.randn(vocab, dim)
    row_ids = torch.tensor([vocab - 1, 0, 1, vocab // 2, 0, vocab - 1])
    total = torch.zeros(row_ids.numel(), dim)
    for partition, low, size in flat_partitions(matrix, ranks):
        block, touching = owned_rows(partition, low, size, (vocab, dim), row_ids, "cpu")
        assert torch.isfinite(block).all()  # the padding never leaks in
        owner_cols = [[low <= r * dim + c < low + size for c in range(dim)] for r in row_ids.tolist()]
        owner = torch.tensor(owner_cols)
        assert torch.equal(block[~owner], torch.zeros_like(block[~owner]))
        assert touching.tolist() == owner.any(-1).tolist()
        total += block
    torch.testing.assert_close(total, matrix[row_ids], rtol=0, atol=0)


def test_owned_rows_keep_the_partition_dtype_and_handle_no_rows():
    matrix = torch.randn(6, 4).to(torch.bfloat16)
    (partition, low, size), _ = flat_partitions(matrix.float(), 2)
    block, touching = owned_rows(partition.to(torch.bfloat16), low, size, (6, 4), torch.tensor([5, 2]), "cpu")
    assert block.dtype == torch.bfloat16 and touching.tolist() == [False, True]
    empty, none = owned_rows(partition, low, size, (6, 4), torch.zeros(0, dtype=torch.long), "cpu")
    assert empty.shape == (0, 4) and none.shape == (0,)
