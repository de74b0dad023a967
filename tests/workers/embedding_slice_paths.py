"""Run by real ranks (torchrun): an embedding matrix partitioned by ZeRO-3 (zero.Init), and rows and
target cosines fetched through every path for request patterns that stress the exchange. Each rank
saves what it got, with the bytes and path, for tests/distributed/test_embedding_slice.py to compare with the
unpartitioned matrix.

usage: embedding_slice_paths.py MODE OUT_FILE [VOCAB DIM]
  MODE: plain | hpz (ZeRO++ secondary partitions of 2 ranks) | offload (partitions on the host)
"""

import sys

import deepspeed
import torch

from plot_ds.distributed.process_group import init_distributed
from plot_ds.distributed.embedding_slice import PATHS, EmbeddingRows


CASES = ("varied", "empty_on_last", "all_elsewhere", "uniform", "hot")


def requests(case: str, rank: int, world: int, vocab: int, dim: int, size: int) -> torch.Tensor:
    """Distinct row ids this rank asks for, in a scrambled order."""
    generator = torch.Generator().manual_seed(100 + rank)
    owned = torch.arange(vocab) * dim // size
    cut = [((r + 1) * size) // dim for r in range(world - 1) if ((r + 1) * size) % dim]  # rows a boundary cuts
    if case == "varied":  # different sizes per rank, rows cut by partition ends, the last row
        ids = torch.randperm(vocab, generator=generator)[: 17 + 23 * rank].tolist() + cut + [vocab - 1, 0]
    elif case == "empty_on_last":
        ids = [] if rank == world - 1 else torch.randperm(vocab, generator=generator)[:40].tolist() + cut
    elif case == "all_elsewhere":  # nothing this rank owns
        elsewhere = (owned != rank).nonzero().squeeze(-1)
        ids = elsewhere[torch.randperm(elsewhere.numel(), generator=generator)[:60]].tolist()
    elif case == "uniform":  # the same number of rows on every rank, at any world size
        ids = torch.randperm(vocab, generator=generator)[:60].tolist()
    elif case == "hot":  # frequent low ids every rank wants, plus a few of its own
        ids = list(range(64)) + torch.randperm(vocab, generator=generator)[:8].tolist()
    else:
        raise ValueError(case)
    ids = sorted(set(ids))
    return torch.tensor(ids, dtype=torch.long)[torch.randperm(len(ids), generator=generator)]


def main(mode: str, out_file: str, vocab: str = "1001", dim: str = "64") -> None:
    vocab, dim = int(vocab), int(dim)
    dist = init_distributed()
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if mode == "hpz":
        zero["zero_hpz_partition_size"] = 2
    if mode == "offload":
        zero["offload_param"] = {"device": "cpu"}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
    with deepspeed.zero.Init(config_dict_or_path=config):
        embedding = torch.nn.Embedding(vocab, dim)
    weight = embedding.weight
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
        if dist.rank == 0:
            torch.manual_seed(0)
            weight.data.copy_(torch.randn(vocab, dim))
    with deepspeed.zero.GatheredParameters([weight]):
        matrix = weight.detach().clone()
    size = int(weight.ds_tensor.ds_numel if hasattr(weight.ds_tensor, "ds_numel") else weight.ds_tensor.numel())

    results = {"matrix": matrix, "partition_size": size, "world": dist.world_size}
    for case in CASES:
        ids = requests(case, dist.rank, dist.world_size, vocab, dim, size)
        generator = torch.Generator().manual_seed(7 + dist.rank)
        support = (
            ids[torch.randint(0, max(ids.numel(), 1), (ids.numel() // 4, 5), generator=generator)]
            if ids.numel()
            else torch.zeros(0, 5, dtype=torch.long)
        )
        targets = support[:, 0] if support.numel() else torch.zeros(0, dtype=torch.long)
        results[case] = {"ids": ids, "support": support, "targets": targets}
        for path in PATHS:
            rows_of = EmbeddingRows(weight, path)
            rows, rows_bytes = rows_of(ids, torch.device("cpu"))
            rows_path = rows_of.last_path
            cosines, cosine_bytes = rows_of.target_cosines(support, targets, torch.device("cpu"))
            results[case][path] = {
                "rows": rows,
                "rows_bytes": rows_bytes,
                "rows_path": rows_path,
                "cosines": cosines,
                "cosine_bytes": cosine_bytes,
                "cosine_path": rows_of.last_path,
            }
    torch.save(results, f"{out_file}.rank{dist.rank}")
    torch.distributed.barrier()
    # Torn down here rather than at interpreter exit, where 8 loaded ranks have aborted once in
    # gloo's teardown ("terminate called without an active exception") after all their work.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
