"""Batched log-domain Sinkhorn (plot_ds.objectives.ot_solvers.sinkhorn_log) vs a loop over POT's exact
``ot.emd2``, on the same OT problems, side by side in one run: speed ratio and error.

    python bench/sinkhorn_vs_pot.py [--problems 1024] [--k 65] [--rho 0.3] [--eps 0.01] [--iters 200]

The problems are PLOT's `ref_mix` problems at the default shapes: N response positions, each with
a support of K = top_k + 1 tokens, the policy's restricted distribution a, the target
b = (1 - rho) delta(y) + rho * p_ref, and the cosine cost between the support tokens' rows of the
real SmolLM2-135M embedding matrix. Distributions are drawn as softmaxes of Gaussian logits with a
temperature that gives peaked, LM-like distributions. Both solvers compute the value and its
gradient with respect to a (what training backpropagates); the error is on the value (the exact
dual potentials are not unique, so gradients are not compared). POT always runs on the CPU, one
problem at a time; Sinkhorn runs batched on --device (default: DeepSpeed's accelerator).
Prints one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from plot_ds.objectives.ot_solvers import emd_pot, sinkhorn_log  # noqa: E402


def embedding_matrix(model: str) -> torch.Tensor:
    from safetensors import safe_open

    from plot_ds.assets import resolve_model_path

    folder = resolve_model_path(model)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as handle:
                for key in handle.keys():
                    if key.endswith("embed_tokens.weight"):
                        return handle.get_tensor(key).float()
    raise SystemExit(f"no embed_tokens.weight in {folder}")


def problems(matrix: torch.Tensor, n: int, k: int, rho: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(matrix.shape[0], generator=generator)[:k] for _ in range(n)])
    unit = F.normalize(matrix[ids], dim=-1)
    cost = 1.0 - unit @ unit.transpose(-1, -2)
    a = (3.0 * torch.randn(n, k, generator=generator)).softmax(-1)
    reference = (3.0 * torch.randn(n, k, generator=generator)).softmax(-1)
    target = F.one_hot(torch.randint(0, k, (n,), generator=generator), k).float()
    b = (1 - rho) * target + rho * reference
    return a, b, cost.clamp_min(0)


def solve_timed(solver, a, b, M, repeats: int, synchronize):
    seconds, value = [], None
    for _ in range(repeats):
        a_ = a.clone().requires_grad_(True)
        synchronize()
        start = time.perf_counter()
        value = solver(a_, b, M)
        torch.autograd.grad(value.sum(), a_)
        synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), value.detach().cpu()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--problems", type=int, default=1024, help="N: response positions in a micro-batch")
    parser.add_argument("--k", type=int, default=65, help="support size: top_k + 1")
    parser.add_argument("--rho", type=float, default=0.3)
    parser.add_argument("--eps", type=float, default=0.01, help="plot.sinkhorn_eps")
    parser.add_argument("--iters", type=int, default=200, help="plot.sinkhorn_iters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="for Sinkhorn; default: DeepSpeed's accelerator")
    args = parser.parse_args()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device = torch.device(args.device or accelerator.current_device_name())

    a, b, M = problems(embedding_matrix(args.model), args.problems, args.k, args.rho, args.seed)
    exact_s, exact = solve_timed(emd_pot, a, b, M, args.repeats, lambda: None)
    solve = lambda a_, b_, M_: sinkhorn_log(a_, b_, M_, eps=args.eps, n_iters=args.iters)  # noqa: E731
    solve_timed(solve, a[:8].to(device), b[:8].to(device), M[:8].to(device), 1, accelerator.synchronize)  # warm-up
    sinkhorn_s, approx = solve_timed(
        solve, a.to(device), b.to(device), M.to(device), args.repeats, accelerator.synchronize
    )
    error = (approx - exact).abs()
    print(
        json.dumps(
            {
                "benchmark": "sinkhorn_vs_pot",
                "problems": args.problems,
                "k": args.k,
                "rho": args.rho,
                "eps": args.eps,
                "iters": args.iters,
                "threads": torch.get_num_threads(),
                "device": str(device),
                "pot_loop_seconds": exact_s,
                "sinkhorn_batched_seconds": sinkhorn_s,
                "speedup_sinkhorn_over_pot_loop": exact_s / sinkhorn_s,
                "mean_W": exact.mean().item(),
                "abs_error_mean": error.mean().item(),
                "abs_error_max": error.max().item(),
                "rel_error_mean": (error / exact.clamp_min(1e-12)).mean().item(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
