"""Optimal-transport solvers with one signature, batched, on any device.

    solver(a, b, M) -> W

``a`` and ``b`` are [N, K] histograms (each row sums to 1, zeros allowed), ``M`` is the [N, K, K]
ground cost, ``W`` the [N] transport costs min_P <P, M> over couplings of (a, b). Gradients
follow POT's ``ot.emd2`` convention: dW/da and dW/db are the (mean-centred) dual potentials,
dW/dM is the transport plan.
"""

from __future__ import annotations

import torch


def closed_form_onehot(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Exact W when every ``b`` row is a point mass: all of ``a`` moves to that one token, so
    W = sum_i a_i M[i, target] = a^T M b. No iteration, no host sync."""
    return torch.einsum("ni,nij,nj->n", a, M, b)


def _center(potential: torch.Tensor) -> torch.Tensor:
    return potential - potential.mean(-1, keepdim=True)


def _attach_gradients(a, b, M, plan, f, g) -> torch.Tensor:
    """Value <P, M>; gradients f, g (centred, as POT) for a, b and the plan for M, without
    differentiating through the iterations (the envelope theorem makes that unnecessary)."""
    value = (plan * M.detach()).sum((-2, -1))
    value = value + (_center(f) * (a - a.detach())).sum(-1) + (_center(g) * (b - b.detach())).sum(-1)
    return value + (plan * (M - M.detach())).sum((-2, -1))


def epsilon_schedule(eps: float, n_iters: int, start: float = 1.0) -> list[float]:
    """Epsilon scaling: decay geometrically from ``start`` (the scale of the costs) to ``eps`` over
    the first half of the iterations, then hold. Warm-started potentials make small eps converge
    in a fixed budget where plain Sinkhorn needs O(1/eps) iterations."""
    if eps >= start or n_iters < 2:
        return [eps] * n_iters
    decay_steps = max(1, n_iters // 2)
    ratio = (eps / start) ** (1.0 / decay_steps)
    return [max(eps, start * ratio**i) for i in range(n_iters)]


def sinkhorn_log(
    a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, eps: float = 1e-3, n_iters: int = 200
) -> torch.Tensor:
    """Batched log-domain Sinkhorn in float32 with a fixed iteration count (no convergence test,
    so no host synchronisation). Zero-mass entries are excluded via log(0) = -inf.

    The potentials f, g of P_ij = exp((f_i + g_j - M_ij) / eps + log a_i + log b_j) approach the
    unregularised dual potentials as eps -> 0 (see ``epsilon_schedule`` for how few iterations
    that takes).
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    with torch.no_grad():
        a_, b_, M_ = a.detach().to(dtype), b.detach().to(dtype), M.detach().to(dtype)
        log_a = torch.where(a_ > 0, a_.log(), torch.full_like(a_, -torch.inf))
        log_b = torch.where(b_ > 0, b_.log(), torch.full_like(b_, -torch.inf))
        f = torch.zeros_like(a_)
        g = torch.zeros_like(b_)
        for step_eps in epsilon_schedule(eps, n_iters):
            scaled = -M_ / step_eps
            f = -step_eps * torch.logsumexp(scaled + (g / step_eps + log_b).unsqueeze(-2), dim=-1)
            g = -step_eps * torch.logsumexp(scaled + (f / step_eps + log_a).unsqueeze(-1), dim=-2)
        log_plan = -M_ / eps + (f / eps + log_a).unsqueeze(-1) + (g / eps + log_b).unsqueeze(-2)
        plan = log_plan.exp()
        # f and g are c-transforms, finite also where a mass is zero: there they give the
        # one-sided derivative of moving a little mass onto that token.
    return _attach_gradients(a, b, M, plan.to(a.dtype), f.to(a.dtype), g.to(a.dtype))


def emd_pot(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Exact earth mover's distance through POT's ``ot.emd2``, one problem at a time on the CPU.
    The reference for validation and for small sequence-level supports, not for the hot path."""
    import ot

    values = []
    for a_i, b_i, M_i in zip(a, b, M):
        values.append(ot.emd2(a_i.double().cpu(), b_i.double().cpu(), M_i.double().cpu()))
    return torch.stack(values).to(device=a.device, dtype=a.dtype)


SOLVERS = {"closed_form": closed_form_onehot, "sinkhorn": sinkhorn_log, "emd": emd_pot}
