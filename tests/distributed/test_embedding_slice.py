"""The embedding-slice arithmetic that needs no ranks: owner-filled rows of ZeRO-3's flat partitions.
(Rows and cosines fetched across real ranks are tested in test_training_distributed.)"""

import pytest
import torch

from plot_ds.distributed.zero_layout import owned_rows


def flat_partitions(matrix: torch.Tensor, ranks: int) -> list[tuple[torch.Tensor, int, int]]:
    """ZeRO-3's layout: the flattened matrix padded to a multiple of ``ranks``, cut into equal
    contiguous partitions; (partition, first element, size) per rank."""
    flat = matrix.flatten()
    size = -(-flat.numel() // ranks)
    padded = torch.cat([flat, torch.full((size * ranks - flat.numel(),), float("nan"))])
    return [(padded[r * size : (r + 1) * size].clone(), r * size, size) for r in range(ranks)]


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


# --- Every path across real ranks (tests/workers/embedding_slice_paths.py) ---------------------------

import torch.nn.functional as F  # noqa: E402

from conftest import WORKERS, torchrun  # noqa: E402
from plot_ds.distributed.embedding_slice import PATHS  # noqa: E402
from plot_ds.distributed.slice_cost import all_gather_received  # noqa: E402

CASES = ("varied", "empty_on_last", "all_elsewhere", "uniform", "hot")


def run_paths(tmp_path, mode: str, ranks: int) -> list[dict]:
    out = tmp_path / f"{mode}{ranks}"
    torchrun(ranks, WORKERS / "embedding_slice_paths.py", mode, out, output=tmp_path)
    return [torch.load(f"{out}.rank{rank}", weights_only=False) for rank in range(ranks)]


@pytest.fixture(scope="module")
def path_results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("slice_paths")
    return {
        (mode, ranks): run_paths(tmp, mode, ranks)
        for mode, ranks in (("plain", 2), ("plain", 3), ("plain", 4), ("plain", 8), ("hpz", 4), ("offload", 2))
    }


@pytest.mark.parametrize(
    "mode,ranks", [("plain", 2), ("plain", 3), ("plain", 4), ("plain", 8), ("hpz", 4), ("offload", 2)]
)
def test_every_path_gives_the_rows_and_cosines_of_the_unpartitioned_matrix(path_results, mode, ranks):
    # Partition ends inside rows (1001 x 64 split in 2, 3, 4, 8), a rank asking for nothing, ranks
    # whose rows all live elsewhere, the same hot rows on every rank.
    results = path_results[(mode, ranks)]
    assert all(r["world"] == ranks for r in results)
    assert results[0]["partition_size"] % 64 != 0  # boundaries really cut rows
    for rank, result in enumerate(results):
        matrix = result["matrix"]
        unit = F.normalize(matrix, dim=-1)
        for case in CASES:
            got = result[case]
            expected_cosines = (unit[got["support"]] * unit[got["targets"]].unsqueeze(1)).sum(-1)
            for path in PATHS:
                assert torch.equal(got[path]["rows"], matrix[got["ids"]]), (rank, case, path)
                torch.testing.assert_close(got[path]["cosines"], expected_cosines, rtol=0, atol=2e-6)
            # the all-to-all's rows are the full gather's, so its cosines are too, bit for bit
            assert torch.equal(got["all_to_all"]["cosines"], got["full"]["cosines"]), (rank, case)
            for path in ("allreduce", "all_to_all", "full"):
                assert got[path]["rows_path"] == got[path]["cosine_path"] == path
            assert got["slice"]["rows_path"] in ("allreduce", "all_to_all")
            full_bytes = all_gather_received(result["partition_size"] * 4, ranks)
            assert got["full"]["rows_bytes"] == got["full"]["cosine_bytes"] == full_bytes
            assert 0 < got["all_to_all"]["rows_bytes"] < full_bytes
    for case in CASES:  # every rank took the same path: they share the collectives
        assert len({(r[case]["slice"]["rows_path"], r[case]["slice"]["cosine_path"]) for r in results}) == 1


def mean_bytes(results: list[dict], case: str, path: str, kind: str) -> float:
    return sum(r[case][path][kind] for r in results) / len(results)


def test_all_to_all_bytes_per_rank_do_not_grow_with_the_ranks_and_slice_picks_the_cheaper(path_results):
    two, eight = path_results[("plain", 2)], path_results[("plain", 8)]
    # 60 rows per rank at both world sizes. The all-reduce path carries every rank's rows; the
    # all-to-all path a rank's own, of which a share (R - 1) / R lives elsewhere, so its bytes rise
    # from R = 2 to 8 towards a bound that does not depend on R but for the R split counts: every row
    # received (id out, row back), the V-count histogram all-reduced.
    for results in (two, eight):
        ranks = len(results)
        bound = 2 * 1001 * 4 + 8 * ranks + 60 * (8 + 64 * 4)
        for rank_result in results:
            assert rank_result["uniform"]["all_to_all"]["rows_bytes"] <= bound
    assert mean_bytes(eight, "uniform", "all_to_all", "rows_bytes") < 2 * mean_bytes(
        two, "uniform", "all_to_all", "rows_bytes"
    )
    assert mean_bytes(eight, "uniform", "allreduce", "rows_bytes") > 3 * mean_bytes(
        two, "uniform", "allreduce", "rows_bytes"
    )
    for results in path_results.values():
        for case in CASES:
            for kind, path_kind in (("rows_bytes", "rows_path"), ("cosine_bytes", "cosine_path")):
                chosen = results[0][case]["slice"][path_kind]
                other = "allreduce" if chosen == "all_to_all" else "all_to_all"
                # the model chose from the sizes; the counted bytes agree, allowing the model's
                # mean over ranks for the padded all-gathers and the small agreement all-reduce
                assert mean_bytes(results, case, "slice", kind) <= 1.1 * mean_bytes(results, case, other, kind) + 64
    assert eight[0]["uniform"]["slice"]["rows_path"] == "all_to_all"
