"""Losses: every registered loss on small tensors, each checked against values worked out by hand with math."""
from __future__ import annotations

import math

import pytest
import torch

from dpolab.errors import ConfigError, TrainingError
from dpolab.losses import LOSSES, LossOutput, SequenceLogps, compute_loss, loss_options, needs_reference
from dpolab.losses.cdpo import cdpo
from dpolab.losses.hinge import hinge
from dpolab.losses.ipo import ipo
from dpolab.losses.odpo import odpo
from dpolab.losses.rdpo import rdpo
from dpolab.losses.robust import robust
from dpolab.losses.sft import sft
from dpolab.losses.sigmoid import dpo
from dpolab.losses.simpo import simpo


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def nls(z: float) -> float:
    """−log σ(z) = log(1 + e^(−z)), on plain floats."""
    return math.log(1 + math.exp(-z))


# Two pairs used by most tests. Log-ratios: chosen [1, -1], rejected [-1, 1]; so h = [2, -2].
# Tokens: chosen [2, 4], rejected [4, 2].
def pairs(**overrides) -> SequenceLogps:
    values = dict(
        chosen=t([-1.0, -3.0]),
        rejected=t([-4.0, -1.0]),
        chosen_tokens=t([2.0, 4.0]),
        rejected_tokens=t([4.0, 2.0]),
        ref_chosen=t([-2.0, -2.0]),
        ref_rejected=t([-3.0, -2.0]),
    )
    values.update(overrides)
    return SequenceLogps(**values)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, t(expected), rtol=0, atol=1e-12)


# --- every loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_shape_finite_and_gradients(name):
    chosen = torch.tensor([-5.0, -12.0, -3.5], requires_grad=True)
    rejected = torch.tensor([-6.0, -9.0, -4.0], requires_grad=True)
    lp = SequenceLogps(
        chosen=chosen,
        rejected=rejected,
        chosen_tokens=torch.tensor([4.0, 9.0, 2.0]),
        rejected_tokens=torch.tensor([5.0, 7.0, 3.0]),
        ref_chosen=torch.tensor([-5.5, -11.0, -3.0]),
        ref_rejected=torch.tensor([-5.0, -9.5, -4.5]),
        score_chosen=torch.tensor([8.0, 6.5, 3.0]),
        score_rejected=torch.tensor([2.0, 6.0, 1.0]),
    )
    out = compute_loss(name, lp)
    assert isinstance(out, LossOutput)
    for tensor in (out.losses, out.chosen_rewards, out.rejected_rewards):
        assert tensor.shape == (3,)
        assert torch.isfinite(tensor).all()
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert chosen.grad is not None and torch.isfinite(chosen.grad).all()
    assert rejected.grad is None or torch.isfinite(rejected.grad).all()  # sft never reads the rejected


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_has_typed_defaulted_options(name):
    options = loss_options(name)
    assert "beta" in options
    for option, (kind, default) in options.items():
        assert isinstance(default, kind), (option, kind, default)


def test_needs_reference():
    assert {n for n in LOSSES.names() if not needs_reference(n)} == {"simpo", "sft"}


@pytest.mark.parametrize("name", [n for n in LOSSES.names() if needs_reference(n)])
def test_reference_losses_refuse_missing_reference(name):
    lp = pairs(ref_chosen=None, ref_rejected=None, score_chosen=t([2.0, 2.0]), score_rejected=t([1.0, 1.0]))
    with pytest.raises(TrainingError, match="needs reference log-probs"):
        compute_loss(name, lp)


def test_registry_names():
    assert LOSSES.names() == ["dpo", "ipo", "hinge", "cdpo", "robust", "odpo", "rdpo", "simpo", "sft",
                              # TRL's loss types, spelled as TRL does (tests/test_trl_losses.py)
                              "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                              "apo_down", "discopop", "sigmoid_norm"]


# --- each loss by hand ------------------------------------------------------------------------------


def test_dpo_by_hand():
    out = dpo(pairs(), beta=0.5)
    # β·h = 0.5·[2, -2] = [1, -1]
    close(out.losses, [nls(1.0), nls(-1.0)])
    close(out.chosen_rewards, [0.5, -0.5])  # β·[1, -1]
    close(out.rejected_rewards, [-0.5, 0.5])  # β·[-1, 1]


def test_dpo_policy_equal_reference_is_log2_and_zero_rewards():
    logps = t([-7.25, -0.5, -30.0])
    lp = SequenceLogps(
        chosen=logps, rejected=logps - 1, chosen_tokens=t([3.0, 1.0, 12.0]), rejected_tokens=t([3.0, 2.0, 9.0]),
        ref_chosen=logps.clone(), ref_rejected=logps - 1,
    )
    out = dpo(lp, beta=0.1)
    assert out.losses.tolist() == [math.log(2)] * 3
    assert out.chosen_rewards.tolist() == [0.0] * 3 and out.rejected_rewards.tolist() == [0.0] * 3


def test_ipo_by_hand_averages_log_ratios_per_token():
    out = ipo(pairs(), beta=0.5)
    # target 1/(2β) = 1; h per token: [1/2 - (-1)/4, -1/4 - 1/2] = [0.75, -0.75]
    close(out.losses, [(0.75 - 1) ** 2, (-0.75 - 1) ** 2])  # [0.0625, 3.0625]
    close(out.chosen_rewards, [0.5, -0.5])  # summed log-ratios, like every reference loss


def test_hinge_by_hand():
    close(hinge(pairs(), beta=1.0).losses, [0.0, 3.0])  # max(0, 1 - [2, -2])
    close(hinge(pairs(), beta=0.25).losses, [0.5, 1.5])  # max(0, 1 - 0.25·[2, -2])


def test_cdpo_by_hand():
    out = cdpo(pairs(), beta=0.5, label_smoothing=0.2)
    # β·h = [1, -1]; loss = 0.8·(−log σ(z)) + 0.2·(−log σ(−z))
    close(out.losses, [0.8 * nls(1.0) + 0.2 * nls(-1.0), 0.8 * nls(-1.0) + 0.2 * nls(1.0)])


def test_robust_by_hand_differs_from_cdpo():
    out = robust(pairs(), beta=0.5, label_smoothing=0.2)
    # ((1−ε)·ℓ(z) − ε·ℓ(−z)) / (1 − 2ε), ℓ = −log σ
    expected = [(0.8 * nls(1.0) - 0.2 * nls(-1.0)) / 0.6, (0.8 * nls(-1.0) - 0.2 * nls(1.0)) / 0.6]
    close(out.losses, expected)
    assert expected[0] < 0  # unbiased, so not bounded below, unlike cdpo
    assert not torch.allclose(out.losses, cdpo(pairs(), beta=0.5, label_smoothing=0.2).losses)


@pytest.mark.parametrize("loss", [cdpo, robust])
def test_label_smoothing_zero_is_dpo(loss):
    torch.testing.assert_close(loss(pairs(), beta=0.5, label_smoothing=0.0).losses, dpo(pairs(), beta=0.5).losses)


@pytest.mark.parametrize("loss", [cdpo, robust])
def test_label_smoothing_out_of_range(loss):
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 0.5\)"):
        loss(pairs(), label_smoothing=0.5)


def test_odpo_by_hand():
    lp = pairs(score_chosen=t([5.0, 2.0]), score_rejected=t([3.0, 1.5]))  # gaps [2, 0.5]
    out = odpo(lp, beta=0.5, alpha=1.0)
    # β·h = [1, -1]; default offsets log1p: log 3 and log 1.5
    close(out.losses, [nls(1.0 - math.log(3.0)), nls(-1.0 - math.log(1.5))])
    close(odpo(lp, beta=0.5, alpha=0.5).losses, [nls(1.0 - 0.5 * math.log(3.0)), nls(-1.0 - 0.5 * math.log(1.5))])
    # the authors' code: log of the raw gap, log 2 and log 0.5
    close(odpo(lp, beta=0.5, alpha=1.0, offset="log").losses, [nls(1.0 - math.log(2.0)), nls(-1.0 - math.log(0.5))])
    close(out.chosen_rewards, [0.5, -0.5])


def test_odpo_non_positive_gap_names_positions():
    lp = SequenceLogps(
        chosen=t([-1.0, -2.0, -3.0]), rejected=t([-2.0, -2.0, -2.0]),
        chosen_tokens=t([1.0, 1.0, 1.0]), rejected_tokens=t([1.0, 1.0, 1.0]),
        ref_chosen=t([-1.0, -2.0, -3.0]), ref_rejected=t([-2.0, -2.0, -2.0]),
        score_chosen=t([5.0, 1.0, 2.0]), score_rejected=t([3.0, 1.0, 4.0]),  # gaps [2, 0, -2]
    )
    with pytest.raises(TrainingError, match=r"2 of 3 pairs .*batch positions 1, 2\).*clamp=True"):
        odpo(lp)
    out = odpo(lp, beta=1.0, alpha=1.0, clamp=True, min_gap=1e-3)
    # h = 0 for every pair; gaps become [2, 1e-3, 1e-3]; offsets log1p(gap)
    close(out.losses, [nls(-math.log(3.0)), nls(-math.log1p(1e-3)), nls(-math.log1p(1e-3))])


def test_odpo_missing_scores():
    with pytest.raises(TrainingError, match="needs quality scores"):
        odpo(pairs())
    lp = pairs(score_chosen=t([float("nan"), 2.0]), score_rejected=t([1.0, 1.0]))
    with pytest.raises(TrainingError, match=r"1 of 2 pairs have a missing or non-finite score \(batch positions 0\)"):
        odpo(lp, clamp=True)


def test_rdpo_by_hand():
    out = rdpo(pairs(), beta=0.5, alpha=0.1)
    # β·h = [1, -1]; |y_w| − |y_l| = [2 - 4, 4 - 2] = [-2, 2]; z = β·h + α·(|y_w| − |y_l|) = [0.8, -0.8]
    close(out.losses, [nls(0.8), nls(-0.8)])
    close(out.chosen_rewards, [0.5, -0.5])


def test_rdpo_alpha_zero_is_dpo():
    torch.testing.assert_close(rdpo(pairs(), beta=0.5, alpha=0.0).losses, dpo(pairs(), beta=0.5).losses)


def test_rdpo_pushes_less_towards_a_longer_chosen():
    # Two pairs with the same log-ratios, one whose chosen is longer, one whose chosen is shorter.
    chosen = torch.tensor([-1.0, -1.0], dtype=torch.float64, requires_grad=True)
    lp = SequenceLogps(
        chosen=chosen, rejected=t([-2.0, -2.0]), chosen_tokens=t([30.0, 10.0]), rejected_tokens=t([10.0, 30.0]),
        ref_chosen=t([-1.0, -1.0]), ref_rejected=t([-2.0, -2.0]),
    )
    rdpo(lp, beta=0.1, alpha=0.05).losses.sum().backward()
    longer, shorter = chosen.grad.abs().tolist()
    assert longer < shorter


def test_simpo_by_hand_ignores_reference():
    out = simpo(pairs(), beta=2.0, gamma=1.0)
    # rewards β/|y|·log π: chosen 2·[-1/2, -3/4] = [-1, -1.5]; rejected 2·[-4/4, -1/2] = [-2, -1]
    # z = chosen − rejected − γ = [0, -1.5]
    close(out.losses, [math.log(2.0), nls(-1.5)])
    close(out.chosen_rewards, [-1.0, -1.5])
    close(out.rejected_rewards, [-2.0, -1.0])
    for refs in (dict(ref_chosen=None, ref_rejected=None), dict(ref_chosen=t([9.0, -9.0]), ref_rejected=t([0.0, 5.0]))):
        torch.testing.assert_close(simpo(pairs(**refs), beta=2.0, gamma=1.0).losses, out.losses)


def test_sft_by_hand():
    no_ref = sft(pairs(ref_chosen=None, ref_rejected=None))
    close(no_ref.losses, [0.5, 0.75])  # −log π(y_w)/|y_w| = [1/2, 3/4]
    close(no_ref.chosen_rewards, [-0.5, -0.75])  # per-token log-prob
    close(no_ref.rejected_rewards, [-1.0, -0.5])
    with_ref = sft(pairs(), beta=0.5)
    close(with_ref.losses, [0.5, 0.75])
    close(with_ref.chosen_rewards, [0.5, -0.5])  # DPO-style β·log-ratio


# --- compute_loss -----------------------------------------------------------------------------------


def test_sft_weight_adds_per_token_nll():
    plain = compute_loss("dpo", pairs(), beta=0.5)
    mixed = compute_loss("dpo", pairs(), beta=0.5, sft_weight=0.3)
    close(mixed.losses - plain.losses, [0.3 * 1 / 2, 0.3 * 3 / 4])  # w·(−log π(y_w)/|y_w|)
    torch.testing.assert_close(mixed.chosen_rewards, plain.chosen_rewards)
    close(compute_loss("dpo", pairs(), beta=0.5, sft_weight=0.0).losses, [nls(1.0), nls(-1.0)])


def test_compute_loss_passes_options():
    close(compute_loss("hinge", pairs(), beta=1.0).losses, [0.0, 3.0])


def test_compute_loss_rejects_unknown_option_listing_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown option gamma for loss 'dpo'; valid options: beta"):
        compute_loss("dpo", pairs(), gamma=1.0)
    with pytest.raises(ConfigError, match=r"valid options: beta, alpha, offset, clamp, min_gap"):
        compute_loss("odpo", pairs(), clmap=True)


def test_unknown_loss_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown loss 'simpoo' \(did you mean 'simpo'\?\); choose from dpo, ipo"):
        compute_loss("simpoo", pairs())
    with pytest.raises(ConfigError, match="did you mean 'dpo'"):
        needs_reference("dpoo")


def test_bad_option_values():
    with pytest.raises(ConfigError, match="beta must be > 0"):
        compute_loss("ipo", pairs(), beta=0.0)
    with pytest.raises(ConfigError, match="sft_weight must be >= 0"):
        compute_loss("dpo", pairs(), sft_weight=-1.0)


def test_loss_options_from_signature():
    assert loss_options("odpo") == {"beta": (float, 0.1), "alpha": (float, 1.0), "offset": (str, "log1p"),
                                    "clamp": (bool, False), "min_gap": (float, 1e-3)}
    assert loss_options("simpo") == {"beta": (float, 2.0), "gamma": (float, 1.0)}


def test_sequence_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"ref_chosen has shape \(2, 1\)"):
        pairs(ref_chosen=t([[-2.0], [-2.0]]))
