"""Vanilla preference objectives, each a small module with one signature.

``forward(policy, reference, totals) -> (loss, metrics)`` where ``policy`` and ``reference`` hold
per-pair summed log-probs of one micro-batch and ``totals`` the counts of the whole global batch
(all micro-batches, all ranks). Every loss and metric is a sum over this micro-batch divided by a
global count, so summing them over micro-batches and ranks gives the exact global mean: the
gradient of a step does not depend on how the global batch is split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .logprobs import PairLogps


@dataclass
class GlobalTotals:
    """Counts over the whole global batch of one optimizer step, identical on every rank."""
    pairs: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    input_tokens: torch.Tensor

    @classmethod
    def from_counts(cls, counts: torch.Tensor) -> "GlobalTotals":
        """``counts`` as made by ``data.batch_counts``, summed over the global batch."""
        return cls(*counts.to(torch.float32).unbind())


def _logp_metrics(policy: PairLogps, totals: GlobalTotals) -> dict[str, torch.Tensor]:
    return {"logps/chosen": policy.chosen.detach().sum() / totals.pairs,
            "logps/rejected": policy.rejected.detach().sum() / totals.pairs}


class SFTLoss(nn.Module):
    """Mean negative log-likelihood of the chosen response tokens of the global batch."""
    needs_reference = False

    def forward(self, policy: PairLogps, reference: PairLogps | None, totals: GlobalTotals):
        loss = -policy.chosen.sum() / totals.chosen_tokens
        return loss, _logp_metrics(policy, totals)


class DPOLoss(nn.Module):
    """-log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), with label smoothing
    (conservative DPO: a label is flipped with probability ``label_smoothing``)."""
    needs_reference = True

    def __init__(self, beta: float, label_smoothing: float = 0.0):
        super().__init__()
        self.beta, self.label_smoothing = beta, label_smoothing

    def forward(self, policy: PairLogps, reference: PairLogps, totals: GlobalTotals):
        chosen_rewards = self.beta * (policy.chosen - reference.chosen)
        rejected_rewards = self.beta * (policy.rejected - reference.rejected)
        logits = chosen_rewards - rejected_rewards
        # logsigmoid is stable for any margin: no overflow at |logits| >> 1.
        losses = (-(1 - self.label_smoothing) * F.logsigmoid(logits)
                  - self.label_smoothing * F.logsigmoid(-logits))
        loss = losses.sum() / totals.pairs
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {
            "rewards/chosen": chosen_rewards.sum() / totals.pairs,
            "rewards/rejected": rejected_rewards.sum() / totals.pairs,
            "rewards/margins": (chosen_rewards - rejected_rewards).sum() / totals.pairs,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum() / totals.pairs,
            **_logp_metrics(policy, totals),
        }
        return loss, metrics


def build_objective(config) -> nn.Module:
    """``config`` is the ``objective`` section of the run config."""
    if config.name == "sft":
        return SFTLoss()
    if config.name == "dpo":
        return DPOLoss(config.beta, config.label_smoothing)
    raise ValueError(f"objective.name: unknown objective '{config.name}'")
