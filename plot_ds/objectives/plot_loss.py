"""The PLOT loss: token- (or sequence-) level optimal transport between the policy's next-token
distribution and the preferred one, with a ground cost from the model's own token embeddings.

Implements the project's formulation, ``docs/method.md``:

    L_PLOT = mean_{chosen tokens} W(p~_t, b_t) - lambda * mean_{rejected tokens} W(p~_t, delta(y-_t))

p~_t is the policy distribution restricted to S_t = TopK(p_t, k) U {y_t} and renormalised; the
cost between tokens i, j is ``1 - cos(E_i, E_j)`` (or the L2 distance of normalised rows), with E
detached. Only what the cost needs of E is fetched (see ``embedding_slice``): the cosines to the
target tokens for a one-hot target, else the rows E[U], U = union of all S_t of the micro-batch.
For a top-k support PLOT never reads the [N, V] logits at the N response positions: the log-prob
pass hands it each position's k + 1 support ids and logits, and takes their gradient back into its
own backward (``pair_batch.SupportLogits``). The whole vocabulary (``top_k`` 0) reads the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ot_solvers import SOLVERS
from ..pair_batch import EmbeddingRowSource, ForwardNeeds, PairOutputs, SupportLogits


def top_k_support(logits: torch.Tensor, targets: torch.Tensor, top_k: int, chunk: int = 512) -> SupportLogits:
    """The ``SupportLogits`` of [N, V] logits read on their own (autograd gathers the gradient);
    ``target_logps_and_support`` reads them in its log-prob pass instead. The top-k runs on bounded
    chunks without autograd."""
    with torch.no_grad():
        top = (
            torch.cat([logits[i : i + chunk].topk(top_k, dim=-1).indices for i in range(0, logits.shape[0], chunk)])
            if logits.shape[0]
            else targets.new_zeros(0, top_k)
        )
    ids = torch.cat([top, targets.unsqueeze(-1)], dim=-1)
    return SupportLogits(ids, logits.gather(-1, ids).float())


@dataclass
class Supports:
    """Per response position t: the support S_t as token ids, which slots are real, the slot of
    the target token, and the restricted, renormalised policy distribution p~_t."""

    ids: torch.Tensor  # [N, K] token ids
    valid: torch.Tensor  # [N, K] bool; False for a duplicate slot
    target_slot: torch.Tensor  # [N] index into K of y_t
    probs: torch.Tensor  # [N, K] float32, zero on invalid slots


def restricted_supports(top: SupportLogits, targets: torch.Tensor) -> Supports:
    """S_t = TopK(p_t, k) U {y_t} with a fixed width k + 1: ``top`` holds the top-k ids then the
    target; where the target is among the top k, its second slot is masked."""
    k = top.ids.shape[-1] - 1
    in_top = top.ids[:, :k] == targets.unsqueeze(-1)
    has_target = in_top.any(-1)
    valid = torch.cat([torch.ones_like(in_top), (~has_target).unsqueeze(-1)], -1)
    target_slot = torch.where(has_target, in_top.float().argmax(-1), torch.full_like(targets, k))
    probs = top.logits.float().masked_fill(~valid, -torch.inf).softmax(-1)
    return Supports(top.ids, valid, target_slot, probs)


def whole_vocabulary_supports(logits: torch.Tensor, targets: torch.Tensor) -> Supports:
    """S_t = the whole vocabulary (``top_k`` 0): p~_t = p_t."""
    n, vocab = logits.shape
    ids = torch.arange(vocab, device=logits.device).expand(n, vocab)
    valid = torch.ones(n, vocab, dtype=torch.bool, device=logits.device)
    return Supports(ids, valid, targets, logits.float().softmax(-1))


def distinct_count(ids: torch.Tensor) -> torch.Tensor:
    """How many different ids, as a float32 tensor on their device (torch.unique would make the
    host wait for its output size)."""
    flat = ids.flatten().sort().values
    return (flat[1:] != flat[:-1]).sum(dtype=torch.float32) + float(flat.numel() > 0)


def cost_from_cosine(cosine: torch.Tensor, cost: str) -> torch.Tensor:
    if cost == "cosine":
        return 1.0 - cosine
    return (2.0 - 2.0 * cosine).clamp_min(0.0).sqrt()  # ||a - b|| of unit vectors


def pairwise_cost(left: torch.Tensor, right: torch.Tensor, cost: str) -> torch.Tensor:
    """Cost between L2-normalised embedding rows: [..., K, d] x [..., J, d] -> [..., K, J]."""
    return cost_from_cosine(left @ right.transpose(-1, -2), cost)


class PLOTLoss(nn.Module):
    """Configured by the ``plot`` config section (``config.PlotConfig``); ``embedding_rows`` fetches
    rows of E (under ZeRO-3 an ``embedding_slice.EmbeddingRows``)."""

    def __init__(self, plot_config, embedding_rows: EmbeddingRowSource):
        super().__init__()
        self.cost, self.target = plot_config.cost, plot_config.target
        self.rho, self.granularity = plot_config.rho, plot_config.granularity
        self.rejected_weight = plot_config.rejected_weight
        self.config = plot_config
        self.sinkhorn_eps, self.sinkhorn_iters = plot_config.sinkhorn_eps, plot_config.sinkhorn_iters
        self.embedding_rows = embedding_rows
        # plot.top_k: the k of the top-k supports (read in the log-prob pass, see
        # pair_batch.SupportLogits); 0, or a k as large as the vocabulary, for the whole vocabulary,
        # which needs the [N, V] logits themselves.
        self.top_k = plot_config.top_k if plot_config.top_k < embedding_rows.vocab_size else 0
        ref_mix = plot_config.target == "ref_mix"
        self.needs = ForwardNeeds(
            reference=ref_mix, reference_logits=ref_mix, policy_logits=self.top_k == 0, top_k=self.top_k
        )

    def supports(self, policy: PairOutputs) -> Supports:
        targets = policy.tokens.targets
        if self.top_k == 0:
            return whole_vocabulary_supports(policy.logits, targets)
        top = policy.support if policy.support is not None else top_k_support(policy.logits, targets, self.top_k)
        return restricted_supports(top, targets)

    def solve(self, a, b, M):
        solver = self.config.resolved_solver(a.device.type)
        if solver == "sinkhorn":
            return SOLVERS["sinkhorn"](a, b, M, eps=self.sinkhorn_eps, n_iters=self.sinkhorn_iters)
        return SOLVERS[solver](a, b, M)

    def forward(self, policy: PairOutputs, reference: PairOutputs | None, totals):
        """The policy's top-k ``support`` (or its [N, V] ``logits``: for the whole vocabulary, or
        read here when no support came with them); the reference's ``logits`` for ref_mix."""
        tokens = policy.tokens
        rows, targets = tokens.rows, tokens.targets
        support = self.supports(policy)
        n_pairs = tokens.n_rows // 2
        chosen = rows < n_pairs
        if self.rejected_weight == 0:  # the rejected term is only a metric: no backward through it
            support.probs = torch.where(chosen.unsqueeze(-1), support.probs, support.probs.detach())
        device = targets.device
        # Token granularity never waits on the device: no torch.unique, no boolean-mask indexing,
        # no .item() (the sequence granularity's per-response supports have data-dependent sizes).
        if self.granularity == "sequence":
            unique_ids, slot_rows = torch.unique(support.ids, return_inverse=True)
            raw_rows, moved = self.embedding_rows(unique_ids, device)
            unit_rows = F.normalize(raw_rows.float(), dim=-1)
            w_rows = self._sequence_costs(support, slot_rows, unit_rows, rows, tokens.n_rows)
            w_chosen = w_rows[:n_pairs].sum() / totals.pairs
            w_rejected = w_rows[n_pairs:].sum() / totals.pairs
        else:
            if self.config.resolved_solver() == "closed_form":
                # All mass goes to y_t: W = sum_i p~(i) c(i, y_t) exactly, which needs only the
                # cosines to y_t (no K x K matrix, far fewer bytes than the rows under ZeRO-3).
                cosine, moved = self.embedding_rows.target_cosines(support.ids, targets, device)
                w = (support.probs * cost_from_cosine(cosine, self.cost)).sum(-1)
            else:
                embedded, moved = self.embedding_rows.unit_rows_at(support.ids, device)  # [N, K, d]
                reference_logits = reference.logits.gather(-1, support.ids) if self.target == "ref_mix" else None
                w = self._token_costs(support, embedded, reference_logits, chosen)
            w_chosen = torch.where(chosen, w, 0.0).sum() / totals.chosen_tokens
            w_rejected = torch.where(chosen, 0.0, w).sum() / totals.rejected_tokens
        loss = w_chosen - self.rejected_weight * w_rejected
        metrics = {
            "plot/w_chosen": w_chosen.detach(),
            "plot/w_rejected": w_rejected.detach(),
            "plot/slice_rows": distinct_count(support.ids) / totals.micro_batches,
            # A fill, not a copy from the host: no wait on the device.
            "plot/slice_bytes": torch.full((), float(moved), device=device) / totals.micro_batches,
            "plot/slice_path": torch.full((), self.embedding_rows.last_path_code, device=device) / totals.micro_batches,
        }
        return loss, metrics

    def _token_costs(self, support, embedded, reference, chosen):
        # scatter, not F.one_hot: one_hot reads its input's range back to the host to check it.
        onehot = torch.zeros_like(support.probs).scatter_(-1, support.target_slot.unsqueeze(-1), 1.0)
        target = onehot
        if self.target == "ref_mix":
            with torch.no_grad():
                ref = reference.float().masked_fill(~support.valid, -torch.inf).softmax(-1)
            # The rejected term always compares with its own token (delta(y-_t)).
            mix = (1 - self.rho) * onehot + self.rho * ref
            target = torch.where(chosen.unsqueeze(-1), mix, onehot)
        return self.solve(support.probs, target, pairwise_cost(embedded, embedded, self.cost))

    def _sequence_costs(self, support, slot_rows, unit_rows, rows, n_rows):
        """Per response: OT between the mean restricted distribution and the token histogram,
        on the union of its supports."""
        costs = []
        for row in range(n_rows):
            at = rows == row
            if not at.any():
                costs.append(support.probs.new_zeros(()))
                continue
            local_ids, local = torch.unique(slot_rows[at], return_inverse=True)
            count = int(at.sum())
            a = (
                torch.zeros(local_ids.numel(), device=local.device).index_add(
                    0, local.flatten(), support.probs[at].flatten()
                )
                / count
            )
            target_local = local.gather(1, support.target_slot[at].unsqueeze(-1)).squeeze(-1)
            b = torch.zeros_like(a).index_add(0, target_local, torch.ones_like(target_local, dtype=a.dtype)) / count
            embedded = unit_rows[local_ids]
            M = pairwise_cost(embedded, embedded, self.cost)
            costs.append(self.solve(a.unsqueeze(0), b.unsqueeze(0), M.unsqueeze(0)).squeeze(0))
        return torch.stack(costs)
