"""The PLOT loss against an independent per-position implementation on POT's exact ot.emd2."""

import dataclasses

import ot
import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch

from plot_ds.config import ConfigError, PlotConfig
from plot_ds.data import IGNORE_INDEX
from plot_ds.distributed.embedding_slice import EmbeddingRows
from plot_ds.objectives.objective import GlobalTotals
from plot_ds.forward.logprobs import target_logps_and_support
from plot_ds.pair_batch import PairOutputs, ResponseTokens
from plot_ds.objectives.plot_loss import top_k_support
from plot_ds.objectives.plot_loss import PLOTLoss, restricted_supports

VOCAB, DIM = 40, 6


def make_batch(seed=0, pairs=2, length=9, prompt=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, length, VOCAB, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (2 * pairs, length), generator=g)
    labels[:, :prompt] = IGNORE_INDEX
    labels[1, length - 2 :] = IGNORE_INDEX  # padding on a chosen row
    labels[pairs, length - 3 :] = IGNORE_INDEX  # and on a rejected row
    embedding = torch.nn.Parameter(torch.randn(VOCAB, DIM, generator=g, dtype=torch.float64))
    return logits, labels, embedding


def totals_of(labels):
    pairs = labels.shape[0] // 2
    response = (labels[:, 1:] != IGNORE_INDEX).sum(1).double()
    return GlobalTotals(
        torch.tensor(float(pairs)), response[:pairs].sum(), response[pairs:].sum(), torch.tensor(0.0), torch.tensor(1.0)
    )


def cost_matrix(E, ids, cost):
    unit = F.normalize(E.detach()[ids], dim=-1)
    cos = unit @ unit.T
    return 1 - cos if cost == "cosine" else (2 - 2 * cos).clamp_min(0).sqrt()


def reference_loss(logits, labels, E, config, ref_logits=None):
    """Straight from the spec, one position at a time, with POT's exact EMD."""
    pairs = labels.shape[0] // 2
    token_w = {True: [], False: []}
    seq_w = {True: [], False: []}
    for row in range(labels.shape[0]):
        chosen = row < pairs
        dists, targets, supports = [], [], []
        for t in range(labels.shape[1] - 1):
            y = int(labels[row, t + 1])
            if y == IGNORE_INDEX:
                continue
            z = logits[row, t]
            if config.top_k == 0:
                support = list(range(VOCAB))
            else:
                support = z.detach().topk(config.top_k).indices.tolist()
                if y not in support:
                    support.append(y)
            p = z[support].softmax(-1)
            if config.granularity == "sequence":
                dists.append(p), targets.append(y), supports.append(support)
                continue
            b = torch.zeros(len(support), dtype=torch.float64)
            b[support.index(y)] = 1.0
            if config.target == "ref_mix" and chosen:
                ref = ref_logits[row, t][support].softmax(-1)
                b = (1 - config.rho) * b + config.rho * ref
            token_w[chosen].append(ot.emd2(p, b, cost_matrix(E, support, config.cost)))
        if config.granularity == "sequence" and dists:
            union = sorted(set(i for s in supports for i in s))
            a = torch.zeros(len(union), dtype=torch.float64)
            b = torch.zeros(len(union), dtype=torch.float64)
            for p, y, support in zip(dists, targets, supports):
                a = a + torch.zeros(len(union), dtype=torch.float64).index_add(
                    0, torch.tensor([union.index(i) for i in support]), p
                )
                b[union.index(y)] += 1
            seq_w[chosen].append(ot.emd2(a / len(dists), b / len(dists), cost_matrix(E, union, config.cost)))
    if config.granularity == "sequence":
        w_chosen, w_rejected = sum(seq_w[True]) / pairs, sum(seq_w[False]) / pairs
    else:
        w_chosen = sum(token_w[True]) / len(token_w[True])
        w_rejected = sum(token_w[False]) / len(token_w[False])
    return w_chosen - config.rejected_weight * w_rejected, w_chosen, w_rejected


def head_outputs(logits, tokens, top_k=0):
    """What ``logprobs.forward_pairs`` hands PLOT: the [N, V] logits, and with ``top_k`` the
    support logits read in the log-prob pass (the training path) instead."""
    if not top_k:
        return PairOutputs(None, logits, tokens)
    _, support = target_logps_and_support(logits, tokens.targets, top_k)
    return PairOutputs(None, None, tokens, support)


def compare(config, seed=0, value_tol=3e-6, grad_tol=3e-6, mutate=None, relative=False):
    """Both ways PLOT gets its supports (from the log-prob pass, or read from the logits) against the
    reference implementation; tolerances absolute, or with ``relative`` relative to the reference's
    value and gradient norm."""
    logits, labels, E = make_batch(seed)
    if mutate is not None:
        mutate(logits, labels)
    ref_logits = torch.randn_like(logits)
    theirs_logits = logits.clone().requires_grad_()
    expected, w_chosen, w_rejected = reference_loss(theirs_logits, labels, E, config, ref_logits)
    expected.backward()
    as64 = lambda x: x.detach().double()
    loss = PLOTLoss(config, EmbeddingRows(E))
    tokens = ResponseTokens.of(labels)
    for top_k in {0, loss.top_k}:
        ours_logits = logits.clone().requires_grad_()
        value, metrics = loss(
            head_outputs(tokens.select(ours_logits), tokens, top_k),
            PairOutputs(None, tokens.select(ref_logits), tokens),
            totals_of(labels),
        )
        value.backward()
        tol = dict(rtol=value_tol, atol=0) if relative else dict(atol=value_tol, rtol=0)
        torch.testing.assert_close(as64(value), as64(expected), **tol)
        torch.testing.assert_close(as64(metrics["plot/w_chosen"]), as64(w_chosen), **tol)
        torch.testing.assert_close(as64(metrics["plot/w_rejected"]), as64(w_rejected), **tol)
        if relative:
            error = (ours_logits.grad - theirs_logits.grad).norm() / theirs_logits.grad.norm()
            assert error < grad_tol, f"gradient off by {error:.3%} of its norm"
        else:
            torch.testing.assert_close(ours_logits.grad, theirs_logits.grad, atol=grad_tol, rtol=0)
    assert E.grad is None  # the geometry is a constant
    return metrics


# The loss computes in float32 (as specified); the reference in float64.
EXACT = [("closed_form", 3e-6), ("emd", 3e-6), ("sinkhorn", 5e-6)]


@pytest.mark.parametrize("solver, tol", EXACT)
@pytest.mark.parametrize("cost", ["cosine", "l2"])
def test_onehot_token_loss_every_solver(solver, tol, cost):
    config = PlotConfig(top_k=5, cost=cost, solver=solver, rejected_weight=0.3, sinkhorn_eps=1e-3, sinkhorn_iters=50)
    compare(config, value_tol=tol, grad_tol=tol)


@pytest.mark.parametrize("solver, tol", EXACT)
@pytest.mark.parametrize("degenerate", ["target_outside_top_k", "ties", "concentrated", "k_is_1", "full_vocabulary"])
def test_degenerate_supports(solver, tol, degenerate):
    top_k = {"k_is_1": 1, "full_vocabulary": 0}.get(degenerate, 4)

    def mutate(logits, labels):
        targets = labels[:, 1:]
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        if degenerate == "target_outside_top_k":
            logits[rows, cols, targets[rows, cols]] = -30.0
        elif degenerate == "ties":
            logits[:, :, :10] = 1.0
        elif degenerate == "concentrated":
            logits[rows, cols, (targets[rows, cols] + 1) % VOCAB] = 60.0

    config = PlotConfig(top_k=top_k, solver=solver, rejected_weight=0.5, sinkhorn_eps=1e-3, sinkhorn_iters=50)
    compare(config, seed=1, value_tol=tol, grad_tol=tol, mutate=mutate)


# Sinkhorn (float32, as the loss runs) at eps = 1e-5 and 40000 iterations against the exact
# reference: relative tolerances that a 10% error would break (test_ot_solvers shows what these
# settings reach on single problems in float64).
NON_POINT_MASS = [
    ("emd", dict(value_tol=3e-6, grad_tol=3e-6)),
    ("sinkhorn", dict(value_tol=1e-2, grad_tol=0.05, relative=True)),
]


@pytest.mark.parametrize("solver, tolerances", NON_POINT_MASS)
def test_ref_mix_target(solver, tolerances):
    config = PlotConfig(
        top_k=6, target="ref_mix", rho=0.4, solver=solver, sinkhorn_eps=1e-5, sinkhorn_iters=40000, rejected_weight=0.2
    )
    compare(config, seed=2, **tolerances)


@pytest.mark.parametrize("solver, tolerances", NON_POINT_MASS)
def test_sequence_granularity(solver, tolerances):
    config = PlotConfig(
        top_k=3, granularity="sequence", solver=solver, sinkhorn_eps=1e-5, sinkhorn_iters=40000, rejected_weight=0.5
    )
    compare(config, seed=3, **tolerances)


def test_support_has_fixed_width_and_masks_the_duplicate_target():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0], [5.0, 4.0, 0.0, -1.0]])
    targets = torch.tensor([1, 3])
    support = restricted_supports(top_k_support(logits, targets, top_k=2), targets)
    fused = restricted_supports(target_logps_and_support(logits, targets, top_k=2)[1], targets)
    for name in ("ids", "valid", "target_slot", "probs"):
        assert torch.equal(getattr(fused, name), getattr(support, name)), name
    assert support.ids.tolist() == [[0, 1, 1], [0, 1, 3]]
    assert support.valid.tolist() == [[True, True, False], [True, True, True]]
    assert support.target_slot.tolist() == [1, 2]
    assert support.probs[0, 2] == 0 and torch.allclose(support.probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(support.probs[0, :2], torch.tensor([5.0, 4.0]).softmax(-1))


def test_metrics_report_the_slice():
    metrics = compare(PlotConfig(top_k=5, rejected_weight=0.0))
    logits, labels, _ = make_batch(0)
    tokens = ResponseTokens.of(labels)
    support = top_k_support(tokens.select(logits), tokens.targets, 5)
    assert metrics["plot/slice_rows"] == torch.unique(support.ids).numel()  # |U|, micro-batches = 1
    assert metrics["plot/slice_bytes"] == 0  # an unpartitioned matrix moves nothing


# The loss path's host waits are probed along the whole training path: tests/forward/test_pair_forward.py.


@pytest.mark.parametrize(
    "bad",
    [
        {"solver": "closed_form", "target": "ref_mix"},
        {"solver": "closed_form", "granularity": "sequence"},
        {"top_k": -1},
        {"rho": 1.0},
        {"alpha": -1.0},
    ],
)
def test_invalid_plot_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="plot\\."):
        dataclasses.replace(PlotConfig(), **bad).validate()


def test_auto_solver():
    assert PlotConfig().resolved_solver() == "closed_form"
    assert PlotConfig(target="ref_mix").resolved_solver() == "sinkhorn"
    assert PlotConfig(granularity="sequence").resolved_solver() == "sinkhorn"
    assert PlotConfig(target="ref_mix").resolved_solver("cpu") == "emd"  # faster there (docs/benchmarks.md)
    assert PlotConfig(target="ref_mix", solver="sinkhorn").resolved_solver("cpu") == "sinkhorn"


def test_embedding_option_picks_input_or_lm_head_rows():
    from transformers import LlamaConfig, LlamaForCausalLM
    from plot_ds.distributed.embedding_slice import embedding_rows_for

    untied = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    )
    rows_in = embedding_rows_for(untied, PlotConfig(embedding="input"))
    rows_out = embedding_rows_for(untied, PlotConfig(embedding="output"))
    assert rows_in.weight is untied.get_input_embeddings().weight
    assert rows_out.weight is untied.get_output_embeddings().weight
    ids = torch.tensor([3, 7])
    torch.testing.assert_close(rows_out(ids, torch.device("cpu"))[0], untied.lm_head.weight.detach()[ids])
    assert embedding_rows_for(untied, PlotConfig(enabled=False)) is None
