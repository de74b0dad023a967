"""Every solver against POT's exact ot.emd2: values and gradients, random and degenerate problems."""

import ot
import pytest
import torch
import torch.nn.functional as F

from plot_ds.objectives.ot_solvers import closed_form_onehot, emd_pot, epsilon_schedule, sinkhorn_log


def problems(n=6, k=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, k, generator=g, dtype=dtype).softmax(-1)
    b = torch.rand(n, k, generator=g, dtype=dtype)
    b = b / b.sum(-1, keepdim=True)
    x = F.normalize(torch.randn(n, k, 8, generator=g, dtype=dtype), dim=-1)
    return a, b, (1 - x @ x.transpose(-1, -2)).clamp_min(0)


def pot_values_and_grads(a, b, M):
    values, grads = [], []
    for i in range(a.shape[0]):
        a_i, M_i = a[i].clone().requires_grad_(), M[i].clone().requires_grad_()
        value = ot.emd2(a_i, b[i], M_i)
        value.backward()
        values.append(value.detach())
        grads.append((a_i.grad, M_i.grad))
    return torch.stack(values), grads


def run(solver, a, b, M, **kw):
    a, M = a.clone().requires_grad_(), M.clone().requires_grad_()
    value = solver(a, b, M, **kw)
    value.sum().backward()
    return value.detach(), a.grad, M.grad


def linear_program(a, b, M):
    """min <P, M> over P >= 0 with rows summing to a and columns to b, by scipy's HiGHS: the value,
    the plan and the row potentials, centred (an independent reference, not POT)."""
    import numpy
    from scipy.optimize import linprog

    n, m = M.shape
    rows = numpy.kron(numpy.eye(n), numpy.ones(m))
    cols = numpy.kron(numpy.ones(n), numpy.eye(m))
    result = linprog(
        M.flatten().numpy(),
        A_eq=numpy.vstack([rows, cols]),
        b_eq=numpy.concatenate([a.numpy(), b.numpy()]),
        bounds=(0, None),
        method="highs",
    )
    assert result.status == 0
    f = torch.from_numpy(result.eqlin.marginals[:n])
    return torch.tensor(result.fun, dtype=M.dtype), torch.from_numpy(result.x).reshape(n, m), f - f.mean()


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def test_emd_pot_matches_an_independent_linear_program():
    """Random problems have one optimal plan and, up to a constant, one pair of potentials."""
    a, b, M = problems()
    value, grad_a, grad_M = run(emd_pot, a, b, M)
    for i in range(a.shape[0]):
        expected, plan, potential = linear_program(a[i], b[i], M[i])
        torch.testing.assert_close(value[i], expected, rtol=1e-9, atol=0)
        torch.testing.assert_close(grad_M[i], plan, rtol=0, atol=1e-9)
        torch.testing.assert_close(grad_a[i] - grad_a[i].mean(), potential, rtol=0, atol=1e-9)


def test_sinkhorn_small_eps_matches_emd_on_random_problems():
    """At eps = 1e-5 and 40000 iterations (epsilon scaling from 1), the value, the plan and the
    potentials are within a few per cent of the exact ones: tolerances a 10% error would break."""
    a, b, M = problems(seed=3)
    expected, grads = pot_values_and_grads(a, b, M)
    value, grad_a, grad_M = run(sinkhorn_log, a, b, M, eps=1e-5, n_iters=40000)
    torch.testing.assert_close(value, expected, rtol=2e-3, atol=0)
    for i, (g_a, g_M) in enumerate(grads):
        assert relative(grad_M[i], g_M) < 0.01, i  # the transport plan
        assert relative(grad_a[i] - grad_a[i].mean(), g_a - g_a.mean()) < 0.05, i  # the potentials


def test_sinkhorn_default_settings_are_close_to_emd():
    """plot.sinkhorn_eps = 0.01 and plot.sinkhorn_iters = 200, the defaults, on 64 problems."""
    a, b, M = problems(n=64, k=65, seed=4, dtype=torch.float32)
    expected, _ = pot_values_and_grads(a.double(), b.double(), M.double())
    error = (sinkhorn_log(a, b, M, eps=0.01, n_iters=200).double() - expected).abs()
    assert error.max() < 0.02 and error.mean() < 0.01, (error.max(), error.mean())


@pytest.mark.parametrize("case", ["random", "target_only", "concentrated", "ties", "single"])
def test_onehot_targets_closed_form_equals_sinkhorn_equals_emd(case):
    a, _, M = problems(n=5, k=9, seed=7)
    target = torch.tensor([0, 3, 8, 4, 4])
    if case == "target_only":  # all mass already on the target: W = 0
        a = F.one_hot(target, 9).double()
    elif case == "concentrated":  # all mass on one other token
        a = F.one_hot((target + 1) % 9, 9).double()
    elif case == "ties":
        a = torch.full_like(a, 1 / 9)
    elif case == "single":  # k = 1 plus the target: two-point supports
        a, M = a[:, :2] / a[:, :2].sum(-1, keepdim=True), M[:, :2, :2]
        target = torch.tensor([0, 1, 1, 0, 1])
    b = F.one_hot(target, a.shape[-1]).double()
    expected, grads = pot_values_and_grads(a, b, M)
    for solver, kw in ((closed_form_onehot, {}), (sinkhorn_log, {"eps": 1e-3, "n_iters": 50}), (emd_pot, {})):
        value, grad_a, _ = run(solver, a, b, M, **kw)
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)
        for i, (g_a, _) in enumerate(grads):
            # Potentials are defined up to a constant, and where a has no mass they are not
            # unique (nor used: d softmax / d logit vanishes there): compare centred on a's support.
            on = a[i] > 0
            ours, theirs = grad_a[i][on], g_a[on]
            torch.testing.assert_close(ours - ours.mean(), theirs - theirs.mean(), atol=1e-6, rtol=0)


def test_sinkhorn_ignores_zero_mass_and_runs_in_float32_on_float32_input():
    a, b, M = problems(n=3, k=6, seed=9, dtype=torch.float32)
    a[:, 0] = 0
    a = a / a.sum(-1, keepdim=True)
    b[:, 5] = 0
    b = b / b.sum(-1, keepdim=True)
    value = sinkhorn_log(a, b, M, eps=1e-3, n_iters=1000)
    assert value.dtype == torch.float32 and torch.isfinite(value).all()
    expected, _ = pot_values_and_grads(a.double(), b.double(), M.double())
    torch.testing.assert_close(value.double(), expected, atol=5e-3, rtol=0)


def test_epsilon_schedule_reaches_eps_and_holds():
    schedule = epsilon_schedule(1e-3, 10)
    assert schedule[0] == 1.0 and schedule[-1] == pytest.approx(1e-3) and len(schedule) == 10
    assert all(x >= y for x, y in zip(schedule, schedule[1:]))
    assert epsilon_schedule(2.0, 3) == [2.0, 2.0, 2.0]
