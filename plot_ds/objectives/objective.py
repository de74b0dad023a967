"""Training objectives: L = L_vanilla + alpha * L_PLOT, L_vanilla a weighted sum of vanilla terms.

Each vanilla term is a small module with one signature,
``forward(policy, reference, totals) -> (loss, metrics)``, where ``policy`` and ``reference`` hold
per-pair summed log-probs of one micro-batch and ``totals`` the counts of the whole global batch
(all micro-batches, all ranks). ``Objective`` adds the PLOT term (``plot_loss``). Every loss and metric is a sum over this
micro-batch divided by a global count, so summing them over micro-batches and ranks gives the exact global mean: the
gradient of a step does not depend on how the global batch is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..pair_batch import PairLogps, PairOutputs
from .terms import TERMS
from ..pair_batch import ForwardNeeds, GlobalTotals


def needs_of(term: str) -> ForwardNeeds:
    """What a term's formula reads, as ``terms.TERMS`` declares it."""
    spec = TERMS[term]
    return ForwardNeeds(reference=spec.reference, global_batch=spec.global_batch)


def _logp_metrics(policy: PairLogps, totals: GlobalTotals) -> dict[str, torch.Tensor]:
    return {
        "logps/chosen": policy.chosen.detach().sum() / totals.pairs,
        "logps/rejected": policy.rejected.detach().sum() / totals.pairs,
    }


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

    needs = needs_of("sft")

    def forward(self, policy: PairLogps, reference: PairLogps | None, totals: GlobalTotals):
        loss = -policy.chosen.sum() / totals.chosen_tokens
        return loss, _logp_metrics(policy, totals)


class DPOLoss(nn.Module):
    """-log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), with label smoothing
    (conservative DPO: a label is flipped with probability ``label_smoothing``)."""

    needs = needs_of("dpo")

    def __init__(self, beta: float, label_smoothing: float = 0.0):
        super().__init__()
        self.beta, self.label_smoothing = beta, label_smoothing

    def forward(self, policy: PairLogps, reference: PairLogps, totals: GlobalTotals):
        chosen_rewards = self.beta * (policy.chosen - reference.chosen)
        rejected_rewards = self.beta * (policy.rejected - reference.rejected)
        logits = chosen_rewards - rejected_rewards
        # logsigmoid is stable for any margin: no overflow at |logits| >> 1.
        losses = -(1 - self.label_smoothing) * F.logsigmoid(logits) - self.label_smoothing * F.logsigmoid(-logits)
        return losses.sum() / totals.pairs, _reward_metrics(chosen_rewards, rejected_rewards, policy, totals)


class IPOLoss(nn.Module):
    """(h - 1/(2 beta))^2 with h the difference of length-averaged log-ratios (IPO, Azar et al.)."""

    needs = needs_of("ipo")

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, policy: PairLogps, reference: PairLogps, totals: GlobalTotals):
        chosen_ratio = _mean_logps(policy.chosen, policy.chosen_tokens) - _mean_logps(
            reference.chosen, policy.chosen_tokens
        )
        rejected_ratio = _mean_logps(policy.rejected, policy.rejected_tokens) - _mean_logps(
            reference.rejected, policy.rejected_tokens
        )
        losses = (chosen_ratio - rejected_ratio - 1 / (2 * self.beta)) ** 2
        return losses.sum() / totals.pairs, _reward_metrics(
            self.beta * chosen_ratio, self.beta * rejected_ratio, policy, totals
        )


class SimPOLoss(nn.Module):
    """-log sigmoid(beta/|y+| log pi(y+) - beta/|y-| log pi(y-) - gamma): no reference model."""

    needs = needs_of("simpo")

    def __init__(self, beta: float, gamma: float):
        super().__init__()
        self.beta, self.gamma = beta, gamma

    def forward(self, policy: PairLogps, reference: PairLogps | None, totals: GlobalTotals):
        chosen_rewards = self.beta * _mean_logps(policy.chosen, policy.chosen_tokens)
        rejected_rewards = self.beta * _mean_logps(policy.rejected, policy.rejected_tokens)
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - self.gamma)
        return losses.sum() / totals.pairs, _reward_metrics(chosen_rewards, rejected_rewards, policy, totals)


class PROLoss(nn.Module):
    """PRO (Song et al., AAAI 2024) for a ranking of two, as its paper (Eqs. 4-6) and official code
    define it: -log softmax over the length-normalised log-probs (divided by a static temperature;
    the paper's dynamic one needs reward-model scores) puts the preferred response first, plus
    ``sft_weight`` times the preferred response's NLL, summed over its tokens (the official code's
    sum, not a token mean) and averaged over pairs. No reference model. See docs/method.md."""

    needs = needs_of("pro")

    def __init__(self, temperature: float = 1.0, sft_weight: float = 0.05):
        super().__init__()
        self.temperature, self.sft_weight = temperature, sft_weight

    def forward(self, policy: PairLogps, reference: PairLogps | None, totals: GlobalTotals):
        chosen_scores = _mean_logps(policy.chosen, policy.chosen_tokens)
        rejected_scores = _mean_logps(policy.rejected, policy.rejected_tokens)
        # -log softmax([s+, s-] / T)[0] = -log sigmoid((s+ - s-) / T)
        ranking = -F.logsigmoid((chosen_scores - rejected_scores) / self.temperature)
        losses = ranking - self.sft_weight * policy.chosen
        return losses.sum() / totals.pairs, _reward_metrics(chosen_scores, rejected_scores, policy, totals)


def _smoothed_logsigmoid_loss(scaled: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


class AOTLoss(nn.Module):
    """AOT (Melnyk et al., NeurIPS 2024) as TRL's DPOTrainer computes it, over the global batch.

    Paired: the batch's policy log-ratios log pi(y+) - log pi(y-), sorted, against the reference's,
    sorted: delta_k = (k-th smallest policy log-ratio) - (k-th smallest reference log-ratio).
    Unpaired: the chosen log-ratios log pi(y+)/ref(y+), sorted, against the rejected ones, sorted.
    loss = mean_k -log sigmoid(beta delta_k), with label smoothing. The sorts run over the whole
    global batch (``GlobalTotals.batch``): each pair meets its partner by rank there, so summing
    micro-batches and ranks gives the global loss and gradient exactly."""

    needs = needs_of("aot")

    def __init__(self, beta: float, label_smoothing: float = 0.0, paired: bool = True):
        super().__init__()
        self.beta, self.label_smoothing, self.paired = beta, label_smoothing, paired

    def forward(self, policy: PairLogps, reference: PairLogps, totals: GlobalTotals):
        batch = totals.batch
        if batch is None:
            raise ValueError("AOT sorts over the global batch: GlobalTotals.batch must be set (train_step does)")
        loss_of = lambda delta: _smoothed_logsigmoid_loss(self.beta * delta, self.label_smoothing)  # noqa: E731
        partner = lambda values: batch.lookup(values).to(policy.chosen.dtype)  # noqa: E731
        if self.paired:
            _, ranks = batch.sorted_and_ranks(batch.column("policy_chosen") - batch.column("policy_rejected"))
            reference_sorted, _ = batch.sorted_and_ranks(
                batch.column("reference_chosen") - batch.column("reference_rejected")
            )
            losses = loss_of(policy.chosen - policy.rejected - partner(reference_sorted[ranks]))
        else:
            chosen_sorted, chosen_ranks = batch.sorted_and_ranks(
                batch.column("policy_chosen") - batch.column("reference_chosen")
            )
            rejected_sorted, rejected_ranks = batch.sorted_and_ranks(
                batch.column("policy_rejected") - batch.column("reference_rejected")
            )
            chosen_ratio, rejected_ratio = policy.chosen - reference.chosen, policy.rejected - reference.rejected
            # Each sorted pair k is counted once, at its chosen member; its rejected member adds
            # only its gradient (a zero-valued term).
            with_chosen = loss_of(chosen_ratio - partner(rejected_sorted[chosen_ranks]))
            with_rejected = loss_of(partner(chosen_sorted[rejected_ranks]) - rejected_ratio)
            losses = with_chosen + with_rejected - with_rejected.detach()
        losses = torch.where(batch.positions >= 0, losses, torch.zeros_like(losses))
        return losses.sum() / totals.pairs, _reward_metrics(
            self.beta * (policy.chosen - reference.chosen),
            self.beta * (policy.rejected - reference.rejected),
            policy,
            totals,
        )


class NoVanillaLoss(nn.Module):
    """`none`: PLOT alone."""

    needs = ForwardNeeds()

    def forward(self, policy: PairLogps, reference: PairLogps | None, totals: GlobalTotals):
        return policy.chosen.new_zeros(()), _logp_metrics(policy, totals)


def combined_needs(needs) -> ForwardNeeds:
    """What a sum of terms reads: whatever any of them reads."""
    needs = list(needs)
    return ForwardNeeds(
        **{
            name: any(getattr(n, name) for n in needs)
            for name in ("reference", "reference_logits", "policy_logits", "global_batch")
        },
        top_k=max((n.top_k for n in needs), default=0),
    )


LOSSES = {loss.__name__: loss for loss in (SFTLoss, DPOLoss, IPOLoss, SimPOLoss, PROLoss, AOTLoss)}


class WeightedTerms(nn.Module):
    """L_vanilla = sum_t w_t L_t. Each term logs ``loss/<term>``; other metrics (rewards, log-probs)
    are the first term's that has them."""

    def __init__(self, terms: dict[str, tuple[float, nn.Module]]):
        super().__init__()
        self.names = list(terms)
        self.weights = [weight for weight, _ in terms.values()]
        self.terms = nn.ModuleList([module for _, module in terms.values()])
        self.needs = combined_needs(module.needs for module in self.terms)

    def forward(self, policy: PairLogps, reference: PairLogps | None, totals: GlobalTotals):
        if not self.terms:
            return NoVanillaLoss()(policy, reference, totals)
        total, metrics = 0.0, {}
        for name, weight, term in zip(self.names, self.weights, self.terms):
            loss, term_metrics = term(policy, reference, totals)
            total = total + weight * loss
            for key, value in term_metrics.items():
                metrics.setdefault(key, value)
            metrics[f"loss/{name}"] = loss.detach()
        return total, metrics


class Objective(nn.Module):
    """L = L_vanilla + alpha * L_PLOT on one micro-batch, with every term's metrics."""

    def __init__(self, vanilla: nn.Module, plot: nn.Module | None = None, alpha: float = 1.0):
        super().__init__()
        self.vanilla, self.plot, self.alpha = vanilla, plot, alpha
        # Only PLOT looks at logits beyond the log-probs (PLOTLoss.needs).
        self.needs = combined_needs([vanilla.needs] + ([plot.needs] if plot is not None else []))

    def forward(self, policy: PairOutputs, reference: PairOutputs | None, totals: GlobalTotals):
        loss, metrics = self.vanilla(policy.logps, reference.logps if reference is not None else None, totals)
        if policy.pair_weight != 1.0:  # another rank of a sequence group counts these pairs
            loss = loss * policy.pair_weight
            metrics = {name: value * policy.pair_weight for name, value in metrics.items()}
        metrics["loss/vanilla"] = loss.detach()
        if self.plot is not None:
            plot_loss, plot_metrics = self.plot(policy, reference, totals)
            loss = loss + self.alpha * plot_loss
            metrics.update(plot_metrics)
            metrics["loss/plot"] = plot_loss.detach()
        metrics["loss/total"] = loss.detach()
        return loss, metrics


def build_term(name: str, objective_config) -> nn.Module:
    """One vanilla term, as ``terms.TERMS`` declares it, from the ``objective`` section."""
    if name not in TERMS:
        raise ValueError(f"objective: unknown term '{name}'")
    spec = TERMS[name]
    loss = LOSSES[spec.loss]
    return loss(*(getattr(objective_config, field) for field in spec.parameters), **dict(spec.options))


def build_vanilla(objective_config) -> WeightedTerms:
    """L_vanilla of the ``objective`` config section: its terms with their weights."""
    return WeightedTerms(
        {name: (weight, build_term(name, objective_config)) for name, weight in objective_config.term_weights().items()}
    )


def build_objective(run_config, embedding_rows=None) -> Objective:
    """From the run config (``config.Config``: its ``objective`` and ``plot`` sections);
    ``embedding_rows`` fetches rows of the policy's embedding matrix (``pair_batch.EmbeddingRowSource``),
    needed when PLOT is enabled."""
    from .plot_loss import PLOTLoss

    plot = None
    if run_config.plot.active:
        if embedding_rows is None:
            raise ValueError("PLOT needs the policy's embedding rows (embedding_rows)")
        plot = PLOTLoss(run_config.plot, embedding_rows)
    return Objective(build_vanilla(run_config.objective), plot, run_config.plot.alpha)
