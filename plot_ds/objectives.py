"""Training objectives: L = L_vanilla + alpha * L_PLOT.

Each vanilla objective is a small module with one signature,
``forward(policy, reference, totals) -> (loss, metrics)``, where ``policy`` and ``reference`` hold
per-pair summed log-probs of one micro-batch and ``totals`` the counts of the whole global batch
(all micro-batches, all ranks). ``Objective`` adds the PLOT term (``plot_loss``). Every loss and metric is a sum over this
micro-batch divided by a global count, so summing them over micro-batches and ranks gives the exact global mean: the
gradient of a step does not depend on how the global batch is split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .logprobs import PairLogps, PairOutputs


@dataclass
class GlobalTotals:
    """Counts over the whole global batch of one optimizer step, identical on every rank."""
    pairs: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    input_tokens: torch.Tensor
    micro_batches: torch.Tensor

    @classmethod
    def from_counts(cls, counts: torch.Tensor) -> "GlobalTotals":
        """``counts`` as made by ``data.example_counts`` (one per batch in ``data.collate``), summed
        over the global batch."""
        return cls(*counts.to(torch.float32).unbind())


def _logp_metrics(policy: PairLogps, totals: GlobalTotals) -> dict[str, torch.Tensor]:
    return {"logps/chosen": policy.chosen.detach().sum() / totals.pairs,
            "logps/rejected": policy.rejected.detach().sum() / totals.pairs}


def _reward_metrics(chosen_rewards, rejected_rewards, policy, totals) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.sum() / totals.pairs,
        "rewards/rejected": rejected_rewards.sum() / totals.pairs,
        "rewards/margins": (chosen_rewards - rejected_rewards).sum() / totals.pairs,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum() / totals.pairs,
        **_logp_metrics(policy, totals),
    }


def _mean_logps(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logps / tokens.clamp_min(1).to(logps.dtype)


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
        return losses.sum() / totals.pairs, _reward_metrics(chosen_rewards, rejected_rewards, policy, totals)


class IPOLoss(nn.Module):
    """(h - 1/(2 beta))^2 with h the difference of length-averaged log-ratios (IPO, Azar et al.)."""
    needs_reference = True

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, policy: PairLogps, reference: PairLogps, totals: GlobalTotals):
        chosen_ratio = _mean_logps(policy.chosen, policy.chosen_tokens) - _mean_logps(reference.chosen, policy.chosen_tokens)
        rejected_ratio = (_mean_logps(policy.rejected, policy.rejected_tokens)
                          - _mean_logps(reference.rejected, policy.rejected_tokens))
        losses = (chosen_ratio - rejected_ratio - 1 / (2 * self.beta)) ** 2
        return losses.sum() / totals.pairs, _reward_metrics(self.beta * chosen_ratio, self.beta * rejected_ratio,
                                                            policy, totals)


class SimPOLoss(nn.Module):
    """-log sigmoid(beta/|y+| log pi(y+) - beta/|y-| log pi(y-) - gamma): no reference model."""
    needs_reference = False

    def __init__(self, beta: float, gamma: float):
        super().__init__()
        self.beta, self.gamma = beta, gamma

    def forward(self, policy: PairLogps, reference: PairLogps | None, totals: GlobalTotals):
        chosen_rewards = self.beta * _mean_logps(policy.chosen, policy.chosen_tokens)
        rejected_rewards = self.beta * _mean_logps(policy.rejected, policy.rejected_tokens)
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - self.gamma)
        return losses.sum() / totals.pairs, _reward_metrics(chosen_rewards, rejected_rewards, policy, totals)


class NoVanillaLoss(nn.Module):
    """`none`: PLOT alone."""
    needs_reference = False

    def forward(self, policy: PairLogps, reference: PairLogps | None, totals: GlobalTotals):
        return policy.chosen.new_zeros(()), _logp_metrics(policy, totals)


class Objective(nn.Module):
    """L = L_vanilla + alpha * L_PLOT on one micro-batch, with every term's metrics."""

    def __init__(self, vanilla: nn.Module, plot: nn.Module | None = None, alpha: float = 1.0):
        super().__init__()
        self.vanilla, self.plot, self.alpha = vanilla, plot, alpha
        self.needs_reference = vanilla.needs_reference or bool(plot is not None and plot.needs_reference)
        # Only PLOT looks at logits beyond the log-probs: its top-k supports, read in the log-prob
        # pass, or the [N, V] logits for the whole vocabulary (and the reference's for ref_mix).
        self.policy_top_k = plot.support_top_k if plot is not None else 0
        self.needs_policy_logits = plot is not None and self.policy_top_k == 0
        self.needs_reference_logits = bool(plot is not None and plot.needs_reference)

    def forward(self, policy: PairOutputs, reference: PairOutputs | None, totals: GlobalTotals):
        loss, metrics = self.vanilla(policy.logps, reference.logps if reference is not None else None, totals)
        metrics["loss/vanilla"] = loss.detach()
        if self.plot is not None:
            plot_loss, plot_metrics = self.plot(policy, reference, totals)
            loss = loss + self.alpha * plot_loss
            metrics.update(plot_metrics)
            metrics["loss/plot"] = plot_loss.detach()
        metrics["loss/total"] = loss.detach()
        return loss, metrics


def build_vanilla(config) -> nn.Module:
    """``config`` is the ``objective`` section of the run config."""
    if config.name == "sft":
        return SFTLoss()
    if config.name == "dpo":
        return DPOLoss(config.beta, config.label_smoothing)
    if config.name == "ipo":
        return IPOLoss(config.beta)
    if config.name == "simpo":
        return SimPOLoss(config.beta, config.simpo_gamma)
    if config.name == "none":
        return NoVanillaLoss()
    raise ValueError(f"objective.name: unknown objective '{config.name}'")


def build_objective(config, embedding_rows=None) -> Objective:
    """``config`` is the whole run config; ``embedding_rows`` fetches rows of the policy's
    embedding matrix (``embedding_slice.EmbeddingRows``), needed when PLOT is enabled."""
    from .plot_loss import PLOTLoss

    plot = None
    if config.plot.active:
        if embedding_rows is None:
            raise ValueError("PLOT needs the policy's embedding rows (embedding_rows)")
        plot = PLOTLoss(config.plot, embedding_rows)
    return Objective(build_vanilla(config.objective), plot, config.plot.alpha)
