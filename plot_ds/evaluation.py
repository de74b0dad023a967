"""Held-out evaluation: the objective's loss, rewards and log-probs over all held-out pairs."""
from __future__ import annotations

import torch

from .data import TokenizedPair, collate, example_counts
from .logprobs import forward_pairs, reference_pairs
from .monitoring import reduce_metrics
from .objectives import GlobalTotals


def eval_shards(num_pairs: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's eval batches. Every rank gets the same number of batches, since a ZeRO-3
    forward is a collective; a rank with nothing left gets an empty batch (run as a weightless filler)."""
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
    shards = eval_shards(len(examples), batch_size, rank, world_size)
    counts = example_counts(examples)
    counts[-1] = len(shards) * world_size  # batches: the per-batch metrics are means over these
    totals = GlobalTotals.from_counts(counts.to(policy.device))
    sums: dict[str, torch.Tensor] = {}
    for indices in shards:
        batch = collate([examples[i] for i in indices], pad_id, filler=examples[0])
        reference_out = reference_pairs(reference, batch, objective.needs_reference_logits)
        _, metrics = objective(forward_pairs(policy, batch, objective.needs_policy_logits),
                               reference_out, totals)
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + batch["weight"] * value
    policy.train(was_training)
    return {f"eval/{name}": value for name, value in reduce_metrics(sums).items()}
