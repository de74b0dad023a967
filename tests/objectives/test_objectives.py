import math

import pytest
import torch

from plot_ds.config import ObjectiveConfig
from plot_ds.pair_batch import PairLogps
from plot_ds.forward.global_batch import GlobalPairs, table_rows
from plot_ds.objectives.objective import (
    AOTLoss,
    DPOLoss,
    GlobalTotals,
    IPOLoss,
    PROLoss,
    SFTLoss,
    SimPOLoss,
    WeightedTerms,
    build_vanilla,
)


def logps(chosen, rejected, chosen_tokens=(1.0,), rejected_tokens=(1.0,)):
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    return PairLogps(t(chosen), t(rejected), t(chosen_tokens), t(rejected_tokens))


def totals(pairs, chosen_tokens=1.0, rejected_tokens=1.0):
    return GlobalTotals(*map(torch.tensor, (float(pairs), chosen_tokens, rejected_tokens, 0.0, 1.0)))


def test_sft_is_the_token_mean_nll_of_chosen():
    policy = logps([-6.0, -4.0], [-1.0, -1.0], [3, 2], [1, 1])
    loss, metrics = SFTLoss()(policy, None, totals(2, chosen_tokens=5.0))
    assert loss.item() == pytest.approx(10.0 / 5.0)
    assert metrics["logps/chosen"].item() == pytest.approx(-5.0)
    assert metrics["logps/rejected"].item() == pytest.approx(-1.0)


def test_dpo_matches_hand_computed_values():
    beta = 0.1
    policy = logps([-10.0, -20.0], [-12.0, -15.0])
    reference = logps([-11.0, -19.0], [-11.0, -16.0])
    loss, m = DPOLoss(beta)(policy, reference, totals(2))
    chosen = [beta * 1.0, beta * -1.0]
    rejected = [beta * -1.0, beta * 1.0]
    expected = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen, rejected)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(sum(chosen) / 2, abs=1e-7)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rejected) / 2, abs=1e-7)
    assert m["rewards/margins"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["logps/chosen"].item() == pytest.approx(-15.0)


def test_dpo_equal_logps_is_log_two_and_zero_rewards():
    same = logps([-3.0], [-3.0])
    loss, m = DPOLoss(0.5)(same, same, totals(1))
    assert loss.item() == pytest.approx(math.log(2))
    assert m["rewards/accuracies"].item() == 0.0  # a tie is not a win


@pytest.mark.parametrize("margin", [1e4, -1e4])
def test_dpo_very_large_margins_stay_finite(margin):
    policy = logps([margin], [0.0])
    policy.chosen.requires_grad_(True)
    reference = logps([0.0], [0.0])
    loss, _ = DPOLoss(1.0)(policy, reference, totals(1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(policy.chosen.grad)
    expected = 0.0 if margin > 0 else -margin
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_dpo_label_smoothing_is_conservative_dpo():
    policy, reference = logps([-1.0], [-3.0]), logps([-2.0], [-2.0])
    z = 0.1 * (1.0 - (-1.0))
    loss, _ = DPOLoss(0.1, label_smoothing=0.2)(policy, reference, totals(1))
    expected = -0.8 * math.log(1 / (1 + math.exp(-z))) - 0.2 * math.log(1 / (1 + math.exp(z)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_losses_are_shares_of_the_global_mean():
    """Two micro-batches' losses, each divided by global totals, add up to the whole batch's."""
    policy = logps([-1.0, -2.0, -3.0, -4.0], [-2.0, -2.0, -1.0, -5.0], [1, 2, 3, 4], [1, 1, 1, 1])
    reference = logps([-1.5] * 4, [-2.5] * 4)
    for objective in (SFTLoss(), DPOLoss(0.3), IPOLoss(0.3), SimPOLoss(2.0, 0.5)):
        whole = totals(4, chosen_tokens=10.0, rejected_tokens=4.0)
        full, _ = objective(policy, reference, whole)
        halves = []
        for part in (slice(0, 1), slice(1, 4)):
            pick = lambda p: PairLogps(p.chosen[part], p.rejected[part], p.chosen_tokens[part], p.rejected_tokens[part])
            halves.append(objective(pick(policy), pick(reference), whole)[0])
        assert sum(halves).item() == pytest.approx(full.item(), rel=1e-6)


def test_build_vanilla():
    def only(config):
        vanilla = build_vanilla(config)
        assert len(vanilla.terms) == 1 and vanilla.weights == [1.0]
        return vanilla.terms[0]

    assert isinstance(only(ObjectiveConfig(name="sft")), SFTLoss)
    assert isinstance(only(ObjectiveConfig()), DPOLoss)  # the default: dpo
    assert build_vanilla(ObjectiveConfig(name="none")).terms.__len__() == 0
    assert isinstance(only(ObjectiveConfig(name="ipo")), IPOLoss)
    simpo = only(ObjectiveConfig(name="simpo", beta=2.0, simpo_gamma=0.3))
    assert isinstance(simpo, SimPOLoss) and simpo.gamma == 0.3
    dpo = only(ObjectiveConfig(name="dpo", beta=0.3, label_smoothing=0.1))
    assert isinstance(dpo, DPOLoss) and dpo.beta == 0.3 and dpo.needs.reference
    aot = only(ObjectiveConfig(name="aot_unpaired", label_smoothing=0.1))
    assert isinstance(aot, AOTLoss) and not aot.paired and aot.label_smoothing == 0.1
    pro = only(ObjectiveConfig(name="pro", pro_temperature=2.0, pro_sft_weight=0.1))
    assert isinstance(pro, PROLoss) and (pro.temperature, pro.sft_weight) == (2.0, 0.1) and not pro.needs.reference
    rpo = build_vanilla(ObjectiveConfig(terms={"dpo": 1.0, "sft": 0.2}))
    assert rpo.names == ["dpo", "sft"] and rpo.weights == [1.0, 0.2] and rpo.needs.reference


def test_ipo_matches_hand_computed_values():
    beta = 0.5
    policy = logps([-10.0, -6.0], [-12.0, -6.0], [5, 2], [4, 3])
    reference = logps([-11.0, -6.0], [-11.0, -9.0], [5, 2], [4, 3])
    loss, m = IPOLoss(beta)(policy, reference, totals(2))
    h = [(1.0 / 5 - (-1.0) / 4), (0.0 / 2 - 3.0 / 3)]
    expected = sum((x - 1 / (2 * beta)) ** 2 for x in h) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(beta * sum(h) / 2, rel=1e-6)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)


def test_ipo_equal_logps_and_huge_margins():
    same = logps([-3.0], [-3.0], [2], [2])
    loss, _ = IPOLoss(0.1)(same, same, totals(1))
    assert loss.item() == pytest.approx((1 / 0.2) ** 2)
    huge = logps([1e4], [-1e4], [1], [1])
    loss, _ = IPOLoss(0.1)(huge, logps([0.0], [0.0], [1], [1]), totals(1))
    assert torch.isfinite(loss)


def test_simpo_matches_hand_computed_values_without_reference():
    beta, gamma = 2.0, 0.5
    policy = logps([-10.0, -4.0], [-12.0, -9.0], [5, 2], [4, 3])
    loss, m = SimPOLoss(beta, gamma)(policy, None, totals(2))
    chosen = [beta * -10 / 5, beta * -4 / 2]
    rejected = [beta * -12 / 4, beta * -9 / 3]
    expected = sum(-math.log(1 / (1 + math.exp(-(c - r - gamma)))) for c, r in zip(chosen, rejected)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(sum(chosen) / 2)
    assert m["rewards/accuracies"].item() == pytest.approx(1.0)
    assert not SimPOLoss.needs.reference


@pytest.mark.parametrize("margin", [1e4, -1e4])
def test_simpo_very_large_margins_stay_finite(margin):
    policy = logps([margin], [0.0], [1], [1])
    policy.chosen.requires_grad_(True)
    loss, _ = SimPOLoss(1.0, 0.5)(policy, None, totals(1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(policy.chosen.grad)


def one_batch(policy: PairLogps, reference: PairLogps, pairs: int, chosen_tokens: float, rejected_tokens: float):
    """Totals whose global batch is this one batch (one micro-batch, one rank)."""
    rows = table_rows(policy, reference, torch.arange(pairs), False, pairs)
    return totals(pairs, chosen_tokens, rejected_tokens).with_batch(GlobalPairs(rows, torch.arange(pairs)))


# Log-probs with ties (pairs 0 and 2 have equal policy log-ratios, pairs 1 and 3 equal reference
# log-ratios) and margins of +-1e4 (pairs 4 and 5).
CHOSEN = [-5.0, -3.0, -4.0, -3.5, -1.0, -1e4]
REJECTED = [-6.0, -2.0, -5.0, -7.0, -1e4, -1.0]
REF_CHOSEN = [-5.5, -3.0, -4.2, -3.0, -2.0, -3.0]
REF_REJECTED = [-6.0, -2.5, -4.0, -2.5, -2.0, -2.0]
CHOSEN_TOKENS, REJECTED_TOKENS = [3, 2, 4, 1, 2, 5], [2, 2, 3, 5, 4, 1]
OURS_FOR_TRL = {"sigmoid": "dpo", "ipo": "ipo", "aot": "aot", "aot_unpaired": "aot_unpaired", "sft": "sft"}


def tied_groups(values: torch.Tensor) -> list[list[int]]:
    groups = {}
    for index, value in enumerate(values.tolist()):
        groups.setdefault(value, []).append(index)
    return list(groups.values())


@pytest.mark.parametrize(
    "trl_types, weights, label_smoothing",
    [
        # TRL 1.16's sigmoid takes no label smoothing (conservative DPO is checked by hand above).
        (["sigmoid"], [1.0], 0.0),
        (["ipo"], [1.0], 0.0),
        (["aot"], [1.0], 0.0),
        (["aot"], [1.0], 0.15),
        (["aot_unpaired"], [1.0], 0.0),
        (["aot_unpaired"], [1.0], 0.15),
        (["sigmoid", "sft"], [1.0, 0.2], 0.0),  # RPO: DPO plus NLL on the chosen response
        (["aot", "ipo"], [0.7, 0.3], 0.1),
        (["aot_unpaired", "sft"], [1.0, 0.5], 0.0),
    ],
)
def test_objectives_match_trls_loss_on_identical_log_probs(trl_types, weights, label_smoothing):
    """TRL's DPOTrainer loss (trl_reference) against plot_ds's on the same batch: values, and the
    gradients of every sequence log-prob (AOT's tied entries by their group sums: a sort may hand
    tied entries' gradients to either of them)."""
    from trl_reference import trl_loss

    beta = 0.1
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    tokens = t(CHOSEN_TOKENS), t(REJECTED_TOKENS)
    expected, trl_chosen_grad, trl_rejected_grad = trl_loss(
        trl_types, weights, t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), *tokens, beta, label_smoothing
    )
    chosen, rejected = t(CHOSEN).requires_grad_(), t(REJECTED).requires_grad_()
    policy, reference = PairLogps(chosen, rejected, *tokens), PairLogps(t(REF_CHOSEN), t(REF_REJECTED), *tokens)
    config = ObjectiveConfig(
        terms={OURS_FOR_TRL[name]: w for name, w in zip(trl_types, weights)}, beta=beta, label_smoothing=label_smoothing
    )
    loss, metrics = build_vanilla(config)(
        policy, reference, one_batch(policy, reference, 6, sum(CHOSEN_TOKENS), sum(REJECTED_TOKENS))
    )
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
    assert all(f"loss/{OURS_FOR_TRL[name]}" in metrics for name in trl_types)
    ties = (
        tied_groups(t(CHOSEN) - t(REJECTED))
        + tied_groups(t(CHOSEN) - t(REF_CHOSEN))
        + tied_groups(t(REJECTED) - t(REF_REJECTED))
        if any(name.startswith("aot") for name in trl_types)
        else []
    )
    assert any(len(group) > 1 for group in ties) or not ties  # the data has ties where AOT sorts
    for ours, theirs in ((chosen.grad, trl_chosen_grad), (rejected.grad, trl_rejected_grad)):
        untied = [i for i in range(6) if not any(i in g and len(g) > 1 for g in ties)]
        torch.testing.assert_close(ours[untied], theirs[untied], rtol=1e-10, atol=1e-12)
        for group in (g for g in ties if len(g) > 1):
            torch.testing.assert_close(ours[group].sum(), theirs[group].sum(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("paired", [True, False])
def test_aot_over_micro_batches_of_one_global_table_equals_the_whole_batch(paired):
    """Each micro-batch sees the whole batch's table and its own rows' positions: the sum of the
    micro-batches' losses (and gradients) is the loss of the whole batch in one piece."""
    generator = torch.Generator().manual_seed(0)
    n = 9
    chosen, rejected = -torch.rand(n, generator=generator) * 10, -torch.rand(n, generator=generator) * 10
    reference = PairLogps(
        -torch.rand(n, generator=generator) * 10, -torch.rand(n, generator=generator) * 10, torch.ones(n), torch.ones(n)
    )
    aot = AOTLoss(0.5, 0.1, paired)
    whole_policy = PairLogps(
        chosen.clone().requires_grad_(), rejected.clone().requires_grad_(), torch.ones(n), torch.ones(n)
    )
    whole, _ = aot(whole_policy, reference, one_batch(whole_policy, reference, n, n, n))
    whole.backward()
    table = table_rows(whole_policy, reference, torch.arange(n), False, n)
    parts, grads = 0.0, []
    for piece in (slice(0, 2), slice(2, 7), slice(7, 9)):
        policy = PairLogps(
            chosen[piece].clone().requires_grad_(),
            rejected[piece].clone().requires_grad_(),
            torch.ones(n)[piece],
            torch.ones(n)[piece],
        )
        ref = PairLogps(reference.chosen[piece], reference.rejected[piece], torch.ones(n)[piece], torch.ones(n)[piece])
        part, _ = aot(policy, ref, totals(n, n, n).with_batch(GlobalPairs(table, torch.arange(n)[piece])))
        part.backward()
        parts += part.item()
        grads.append((policy.chosen.grad, policy.rejected.grad))
    assert parts == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([g[0] for g in grads]), whole_policy.chosen.grad)
    torch.testing.assert_close(torch.cat([g[1] for g in grads]), whole_policy.rejected.grad)


def test_aot_ignores_filler_pairs_and_needs_the_global_batch():
    policy, reference = logps([-1.0, -2.0], [-2.0, -1.0]), logps([-1.5, -1.5], [-1.5, -1.5])
    rows = table_rows(policy, reference, torch.arange(2), True, 2)  # a filler micro-batch
    loss, _ = AOTLoss(0.1)(policy, reference, totals(2).with_batch(GlobalPairs(rows, torch.tensor([-1, -1]))))
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="GlobalTotals.batch must be set"):
        AOTLoss(0.1)(policy, reference, totals(2))


def test_pro_for_two_responses_by_hand():
    """-log softmax over (mean log-prob / T) puts the chosen first, plus the SFT term's weight times
    the chosen responses' NLL (summed over tokens, as PRO's code does), both averaged over pairs."""
    policy = logps([-6.0, -2.0], [-3.0, -8.0], [3, 2], [1, 4])
    loss, metrics = PROLoss(temperature=0.5, sft_weight=0.1)(policy, None, totals(2, chosen_tokens=5.0))
    scores = [(-2.0, -3.0), (-1.0, -2.0)]  # (chosen, rejected) mean log-probs
    ranking = sum(-math.log(math.exp(c / 0.5) / (math.exp(c / 0.5) + math.exp(r / 0.5))) for c, r in scores) / 2
    assert loss.item() == pytest.approx(ranking + 0.1 * (6.0 + 2.0) / 2, rel=1e-6)
    # Split into two micro-batches of the same global batch: the parts add up.
    halves = [
        PROLoss(0.5, 0.1)(
            PairLogps(
                policy.chosen[i : i + 1],
                policy.rejected[i : i + 1],
                policy.chosen_tokens[i : i + 1],
                policy.rejected_tokens[i : i + 1],
            ),
            None,
            totals(2, chosen_tokens=5.0),
        )[0]
        for i in range(2)
    ]
    assert sum(halves).item() == pytest.approx(loss.item(), rel=1e-6)
    assert metrics["rewards/accuracies"].item() == 1.0


def test_weighted_terms_sum_their_losses_and_log_each():
    policy, reference = logps([-4.0, -2.0], [-5.0, -1.0], [2, 2], [1, 1]), logps([-4.5, -2.5], [-4.0, -1.5])
    whole = totals(2, chosen_tokens=4.0, rejected_tokens=2.0)
    terms = WeightedTerms({"dpo": (1.0, DPOLoss(0.1)), "sft": (0.2, SFTLoss())})
    loss, metrics = terms(policy, reference, whole)
    dpo, dpo_metrics = DPOLoss(0.1)(policy, reference, whole)
    sft, _ = SFTLoss()(policy, reference, whole)
    assert loss.item() == pytest.approx(dpo.item() + 0.2 * sft.item(), rel=1e-6)
    assert metrics["loss/dpo"].item() == pytest.approx(dpo.item()) and metrics["loss/sft"].item() == pytest.approx(
        sft.item()
    )
    assert metrics["rewards/margins"].item() == pytest.approx(dpo_metrics["rewards/margins"].item())  # the first term's


def test_each_term_is_declared_once_and_the_config_the_docs_and_the_builders_read_it():
    """terms.TERMS: the config's choices are its names (and none), docs/method.md's table
    is rendered from it, each builds the loss it names with the config fields it lists, and the
    loss's needs are the ones it declares."""
    import typing

    from conftest import REPO
    from plot_ds.config import ObjectiveConfig, ObjectiveName
    from plot_ds.objectives.terms import TERMS, terms_table
    from plot_ds.objectives.objective import build_term

    assert set(typing.get_args(ObjectiveName)) == set(TERMS) | {"none"}
    assert terms_table() in (REPO / "docs" / "method.md").read_text()
    config = ObjectiveConfig(beta=0.3, label_smoothing=0.1, simpo_gamma=0.7, pro_temperature=2.0, pro_sft_weight=0.1)
    for name, spec in TERMS.items():
        term = build_term(name, config)
        assert type(term).__name__ == spec.loss
        assert (term.needs.reference, term.needs.global_batch) == (spec.reference, spec.global_batch)
        assert ObjectiveConfig(terms={name: 1.0}).needs_reference == spec.reference
