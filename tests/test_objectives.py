import math

import pytest
import torch

from plot_ds.config import ObjectiveConfig
from plot_ds.logprobs import PairLogps
from plot_ds.objectives import DPOLoss, GlobalTotals, IPOLoss, NoVanillaLoss, SFTLoss, SimPOLoss, build_vanilla


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
    assert isinstance(build_vanilla(ObjectiveConfig(name="sft")), SFTLoss)
    assert isinstance(build_vanilla(ObjectiveConfig(name="none")), NoVanillaLoss)
    assert isinstance(build_vanilla(ObjectiveConfig(name="ipo")), IPOLoss)
    simpo = build_vanilla(ObjectiveConfig(name="simpo", beta=2.0, simpo_gamma=0.3))
    assert isinstance(simpo, SimPOLoss) and simpo.gamma == 0.3
    dpo = build_vanilla(ObjectiveConfig(name="dpo", beta=0.3, label_smoothing=0.1))
    assert isinstance(dpo, DPOLoss) and dpo.beta == 0.3 and dpo.needs_reference


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
    assert not SimPOLoss.needs_reference


@pytest.mark.parametrize("margin", [1e4, -1e4])
def test_simpo_very_large_margins_stay_finite(margin):
    policy = logps([margin], [0.0], [1], [1])
    policy.chosen.requires_grad_(True)
    loss, _ = SimPOLoss(1.0, 0.5)(policy, None, totals(1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(policy.chosen.grad)
