"""ODPO's offset Δ = α·f(score gap) (Amini et al. 2024, arXiv:2402.10571), in float64 with tight tolerances.

Default f = log1p: Δ ≥ 0 and increasing in the gap, so ODPO never asks for less margin than DPO, and at the
reference (h = 0) its loss is log(1 + e^Δ) ≥ log 2. f = "log" is the authors' code. alpha = 0 is DPO exactly.
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from dpolab.contexts import build_pairs
from dpolab.errors import ConfigError
from dpolab.losses import compute_loss, loss_options
from dpolab.losses.base import SequenceLogps
from dpolab.losses.odpo import DEFAULT_OFFSET, offset_summary, offset_values, offsets
from dpolab.losses.sigmoid import dpo
from dpolab.models.fake import FakeChatModel


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, score_chosen, score_rejected) -> SequenceLogps:
    ones = torch.ones(len(policy_chosen), dtype=torch.float64)
    return SequenceLogps(chosen=f64(policy_chosen), rejected=f64(policy_rejected), chosen_tokens=ones,
                         rejected_tokens=ones, ref_chosen=f64(ref_chosen), ref_rejected=f64(ref_rejected),
                         score_chosen=f64(score_chosen), score_rejected=f64(score_rejected))


# Gaps in toxicity points, from a sub-point gap (negative under f = log) to nearly the whole scale.
CHOSEN = [90.0, 50.0, 99.0, 75.25, 40.0]
REJECTED = [80.7, 49.5, 10.0, 75.0, 39.0]
GAPS = [9.3, 0.5, 89.0, 0.25, 1.0]


def test_the_default_is_log1p_with_alpha_one():
    opts = loss_options("odpo")
    assert DEFAULT_OFFSET == "log1p" and opts["offset"] == (str, "log1p") and opts["alpha"] == (float, 1.0)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_loss_at_the_reference_is_softplus_of_the_hand_computed_offset(alpha):
    # policy = reference: h = 0, so loss = −log σ(−Δ) = log(1 + e^Δ), with Δ = α·log(1 + gap)
    pol_c, pol_r = [-3.0, -5.0, -2.0, -7.5, -1.0], [-4.0, -6.0, -9.0, -2.0, -3.0]
    out = compute_loss("odpo", logps(pol_c, pol_r, pol_c, pol_r, CHOSEN, REJECTED), beta=0.1, alpha=alpha)
    deltas = [alpha * math.log(1.0 + g) for g in GAPS]
    expected = [math.log(1.0 + math.exp(d)) for d in deltas]
    torch.testing.assert_close(out.losses, f64(expected), rtol=1e-13, atol=0)
    assert all(loss > math.log(2.0) for loss in out.losses.tolist())  # every gap > 0: more than DPO's log 2


def test_loss_away_from_the_reference_by_hand():
    # h = (−1 − −2) − (−4 − −3) = 2 and (−3 − −2) − (−1 − −2) = −2; gaps 2 and 0.5
    lp = logps([-1.0, -3.0], [-4.0, -1.0], [-2.0, -2.0], [-3.0, -2.0], [5.0, 2.0], [3.0, 1.5])
    out = compute_loss("odpo", lp, beta=0.5, alpha=1.0)
    expected = [math.log1p(math.exp(-(1.0 - math.log(3.0)))), math.log1p(math.exp(-(-1.0 - math.log(1.5))))]
    torch.testing.assert_close(out.losses, f64(expected), rtol=1e-13, atol=0)
    # f = "log" is the authors' code: Δ = log(gap), below zero for the gap of 0.5
    out = compute_loss("odpo", lp, beta=0.5, alpha=1.0, offset="log")
    expected = [math.log1p(math.exp(-(1.0 - math.log(2.0)))), math.log1p(math.exp(-(-1.0 - math.log(0.5))))]
    torch.testing.assert_close(out.losses, f64(expected), rtol=1e-13, atol=0)


@pytest.mark.parametrize("offset", ["log1p", "log"])
def test_alpha_zero_is_dpo_exactly(offset):
    lp = logps([-3.0, -5.5, -0.25], [-4.0, -6.0, -8.0], [-3.2, -5.0, -1.0], [-4.1, -6.3, -7.0],
               [90.0, 50.0, 3.0], [80.0, 49.9, 2.0])
    odpo_out = compute_loss("odpo", lp, beta=0.1, alpha=0.0, offset=offset)
    dpo_out = dpo(lp, beta=0.1)
    assert torch.equal(odpo_out.losses, dpo_out.losses)
    assert torch.equal(compute_loss("dpo", lp, beta=0.1).losses, dpo_out.losses)
    assert torch.equal(odpo_out.chosen_rewards, dpo_out.chosen_rewards)
    assert torch.equal(odpo_out.rejected_rewards, dpo_out.rejected_rewards)


def test_offset_is_zero_at_no_gap_non_negative_and_increasing():
    gaps = f64([0.0, 1e-6, 0.01, 0.25, 0.5, 1.0, 2.0, 9.3, 40.0, 100.0])
    delta = offset_values(gaps, alpha=1.0)
    assert delta[0] == 0.0 and torch.all(delta >= 0)
    assert torch.all(delta[1:] > delta[:-1])
    assert torch.all(offset_values(gaps, alpha=0.3)[1:] > offset_values(gaps, alpha=0.3)[:-1])
    # close to the paper's log(gap) for large gaps: log1p(g) − log(g) = log(1 + 1/g) ≤ 0.1 for g ≥ 10
    big = f64([10.0, 40.0, 100.0])
    assert torch.all(offset_values(big, alpha=1.0) - offset_values(big, alpha=1.0, offset="log") <= math.log(1.1) + 1e-15)


def test_offsets_helper_matches_the_loss_and_marks_non_positive_gaps():
    got = offsets(CHOSEN, REJECTED, alpha=0.7)
    assert got == pytest.approx([0.7 * math.log1p(g) for g in GAPS], rel=1e-14)
    # the loss at h = 0 is softplus of the very same numbers
    zeros = [0.0] * len(CHOSEN)
    loss = compute_loss("odpo", logps(zeros, zeros, zeros, zeros, CHOSEN, REJECTED), beta=0.1, alpha=0.7).losses
    torch.testing.assert_close(loss, torch.nn.functional.softplus(f64(got)), rtol=1e-15, atol=0)
    marked = offsets([2.0, 1.0, 1.0], [1.0, 1.0, 3.0])
    assert marked[0] == pytest.approx(math.log(2.0), rel=1e-15) and math.isnan(marked[1]) and math.isnan(marked[2])


def test_bad_options_are_refused():
    lp = logps([0.0], [0.0], [0.0], [0.0], [2.0], [1.0])
    with pytest.raises(ConfigError, match="offset must be one of log1p, log"):
        compute_loss("odpo", lp, offset="sqrt")
    with pytest.raises(ConfigError, match="alpha must be >= 0"):
        compute_loss("odpo", lp, alpha=-1.0)


def test_summary_of_gaps_by_hand():
    s = offset_summary(GAPS + [0.0], alpha=0.5)
    ordered = sorted(GAPS)
    assert (s["pairs"], s["non_positive_gaps"], s["offset"], s["alpha"]) == (6, 1, "log1p", 0.5)
    assert (s["gap_min"], s["gap_median"], s["gap_max"]) == (0.25, 1.0, 89.0) == (ordered[0], ordered[2], ordered[-1])
    assert s["offset_min"] == pytest.approx(0.5 * math.log(1.25), rel=1e-14)
    assert s["offset_median"] == pytest.approx(0.5 * math.log(2.0), rel=1e-14)
    assert s["offset_max"] == pytest.approx(0.5 * math.log(90.0), rel=1e-14)
    assert (s["negative_offsets"], s["negative_share"]) == (0, 0.0)
    mean_loss = statistics.fmean(math.log1p(math.exp(0.5 * math.log1p(g))) for g in GAPS)
    assert s["initial_loss_mean"] == pytest.approx(mean_loss, rel=1e-14)
    # the authors' f = log on the same gaps: two of five negative
    s = offset_summary(GAPS, alpha=1.0, offset="log")
    assert (s["negative_offsets"], s["negative_share"]) == (2, 0.4)
    assert offset_summary([])["gap_median"] is None


# -- the detox context's info -----------------------------------------------------------------------------------

# Per prompt, its k = 3 samples: near-identical polite replies (a gap of about 0.05 toxicity points, where
# f = log would give an offset near −3), a gap of a point or two, and gaps of tens of points.
SAMPLES = [
    ["Thank you, have a lovely day.", "Thank you, have a really lovely day.", "Thank you, have a lovely day."],
    ["Sure, happy to help with that.", "I think you are wrong about this.", "Sure, happy to help."],
    ["Thank you, have a lovely day.", "That is a silly thing to say.", "Whatever, you jerk."],
    ["Sure, happy to help.", "What a damn mess.", "I think you are wrong about this."],
]


def detox_model() -> FakeChatModel:
    seen: dict[str, int] = {}

    def reply(conv) -> str:
        prompt = conv[-1]["content"]
        n = seen[prompt] = seen.get(prompt, -1) + 1
        return SAMPLES[sum(map(ord, prompt)) % len(SAMPLES)][n % 3]

    return FakeChatModel(name="detox-fake", reply=reply)


def test_detox_info_summarises_the_offsets_of_its_own_pairs():
    data = build_pairs("detox", detox_model(), options={"n_prompts": 24, "k": 3}, seed=0)
    pairs = data.pairs
    assert len(pairs) >= 10
    for p in pairs:  # scores in toxicity points
        assert p.score_chosen == pytest.approx(100.0 * (1.0 - p.meta["toxicity_chosen"]), rel=1e-12)
        assert p.score_rejected == pytest.approx(100.0 * (1.0 - p.meta["toxicity_rejected"]), rel=1e-12)
    chosen, rejected = [p.score_chosen for p in pairs], [p.score_rejected for p in pairs]
    gaps = [c - r for c, r in zip(chosen, rejected)]
    delta = offsets(chosen, rejected)  # the loss's defaults: α = 1, log1p
    info = data.info["odpo"]
    assert (info["pairs"], info["alpha"], info["offset"], info["non_positive_gaps"]) == (len(pairs), 1.0, "log1p", 0)
    assert (info["gap_min"], info["gap_median"], info["gap_max"]) == (min(gaps), statistics.median(gaps), max(gaps))
    assert (info["offset_min"], info["offset_median"], info["offset_max"]) == pytest.approx(
        (min(delta), statistics.median(delta), max(delta)), rel=1e-14, abs=0)
    assert info["offset_min"] >= 0 and (info["negative_offsets"], info["negative_share"]) == (0, 0.0)
    assert min(gaps) < 1.0 and max(gaps) > 10.0  # sub-point gaps too: f = log would make their offsets negative
    assert offset_summary(gaps, offset="log")["negative_offsets"] == sum(g < 1.0 for g in gaps) > 0
    zeros = [0.0] * len(pairs)
    at_reference = compute_loss("odpo", logps(zeros, zeros, zeros, zeros, chosen, rejected)).losses
    assert info["initial_loss_mean"] == pytest.approx(float(at_reference.mean()), rel=1e-13)
    assert info["initial_loss_mean"] > math.log(2.0)
    assert data.info["score_scale"] == 100.0
