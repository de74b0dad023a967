"""Held-out evaluation: the objective's loss, rewards and log-probs over all held-out pairs."""
from __future__ import annotations

import torch

from .data import TokenizedPair, collate, example_counts
from .logprobs import batch_logps
from .monitoring import reduce_metrics
from .objectives import GlobalTotals


def eval_shards(num_pairs: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's eval batches. Every rank gets the same number of batches, since a ZeRO-3
    forward is a collective; a rank with nothing left gets an empty batch (run with no weight)."""
    mine = list(range(rank, num_pairs, world_size))
    per_rank = -(-num_pairs // world_size)
    count = -(-per_rank // batch_size)
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(count)]


@torch.no_grad()
def evaluate(policy, reference, objective, examples: list[TokenizedPair], batch_size: int,
             pad_id: int, rank: int, world_size: int) -> dict[str, float]:
    if not examples:
        return {}
    was_training = policy.training
    policy.eval()
    totals = GlobalTotals.from_counts(example_counts(examples).to(policy.device))
    sums: dict[str, torch.Tensor] = {}
    for indices in eval_shards(len(examples), batch_size, rank, world_size):
        weight = 1.0 if indices else 0.0
        batch = collate([examples[i] for i in (indices or [0])], pad_id)
        reference_logps = batch_logps(reference, batch) if reference is not None else None
        loss, metrics = objective(batch_logps(policy, batch), reference_logps, totals)
        for name, value in {"loss/total": loss, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + weight * value
    policy.train(was_training)
    return {f"eval/{name}": value for name, value in reduce_metrics(sums).items()}
