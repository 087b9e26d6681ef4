"""Statistics of a run: intervals pooled over training seeds (coverage on simulated runs), q-values, the minimum
detectable effect (against a simulated power curve), equivalence and verdicts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dpolab import stats
from dpolab.stats import Verdict


def simulated_run(rng, *, n, seeds, change, item_sd, item_change_sd, seed_sd, noise_sd):
    """A baseline and `seeds` trained models on the same n items: item difficulty u_i (shared by every model),
    an item-specific response to training w_i (shared by every seed), a seed's own shift v_s, and noise."""
    u = rng.normal(scale=item_sd, size=n)
    w = rng.normal(scale=item_change_sd, size=n)
    a = u + rng.normal(scale=noise_sd, size=n)
    bs = [u + change + w + rng.normal(scale=seed_sd) + rng.normal(scale=noise_sd, size=n) for _ in range(seeds)]
    return a, bs


@pytest.mark.parametrize("item_change_sd, seed_sd", [(0.2, 0.4), (0.6, 0.0), (0.4, 0.15)],
                         ids=["seeds dominate", "items dominate", "both"])
def test_seed_pooled_interval_covers_the_truth_at_its_nominal_rate(item_change_sd, seed_sd):
    rng = np.random.default_rng(7)
    runs, change, covered = 300, 0.2, 0
    for t in range(runs):
        a, bs = simulated_run(rng, n=30, seeds=3, change=change, item_sd=1.0, item_change_sd=item_change_sd,
                              seed_sd=seed_sd, noise_sd=0.5)
        iv = stats.seed_pooled_delta(a, bs, seed=t, n_boot=400).interval
        covered += iv.ci_low <= change <= iv.ci_high
    # 95% nominal; 300 runs give a binomial sd of 0.0126, so [0.92, 0.99] is about -2.4 / +3.2 sd (the interval
    # is slightly conservative by design: the seed x item noise enters both variance terms)
    assert 0.92 <= covered / runs <= 0.99


def test_one_seed_is_the_paired_bootstrap():
    rng = np.random.default_rng(1)
    a, b = rng.random(40), rng.random(40)
    pooled = stats.seed_pooled_delta(a, [b], seed=5, n_boot=500)
    assert pooled.interval == stats.paired_bootstrap_delta(a, b, seed=5, n_boot=500)
    assert pooled.seed_deltas == (pooled.interval.value,)


def test_pooled_value_is_the_mean_of_the_seeds_changes():
    rng = np.random.default_rng(2)
    a = rng.random(20)
    bs = [a + k / 10 for k in range(1, 4)]  # seeds change every item by 0.1, 0.2, 0.3
    pooled = stats.seed_pooled_delta(a, bs, seed=0, n_boot=300)
    assert pooled.seed_deltas == pytest.approx((0.1, 0.2, 0.3), rel=1e-12)
    assert pooled.interval.value == pytest.approx(0.2, rel=1e-12)
    assert pooled.se_items == pytest.approx(0.0, abs=1e-12)  # the same shift on every item: no item variance
    assert pooled.se_seeds == pytest.approx(0.1 / math.sqrt(3), rel=1e-12)
    assert pooled.df == pytest.approx(2.0)  # all the variance is the seeds': S - 1 degrees of freedom
    half = pooled.interval.ci_high - pooled.interval.value
    assert half == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3), rel=1e-9)  # t_{0.975, 2}


def test_subset_metrics_are_compared_on_the_items_both_models_define():
    a = [1.0] * 12 + [math.nan] * 3  # a flip rate: defined where the model was right at first
    b = [0.0] * 6 + [1.0] * 6 + [math.nan] * 2 + [1.0]
    d = stats.paired_bootstrap_delta(a, b, seed=0)
    assert d.n == 12 and d.value == 0.5 - 1.0
    pooled = stats.seed_pooled_delta(a, [b, b], seed=0, n_boot=200)
    assert pooled.interval.n == 12 and pooled.interval.value == pytest.approx(-0.5, rel=1e-12)


def test_too_few_items_give_no_interval():
    few = list(range(stats.MIN_ITEMS - 1))
    assert math.isnan(stats.bootstrap_ci(few, seed=0).ci_low)
    assert math.isnan(stats.paired_bootstrap_delta(few, [x + 1 for x in few], seed=0).p)
    assert math.isnan(stats.mde(few, seed=0))
    enough = list(range(stats.MIN_ITEMS))
    assert not math.isnan(stats.bootstrap_ci(enough, seed=0).ci_low)


def test_bootstrap_p_agrees_with_the_interval():
    rng = np.random.default_rng(3)
    for k in range(40):
        a = rng.random(25)
        b = a + rng.normal(loc=(k % 5 - 2) / 20, scale=0.15, size=25)
        d = stats.paired_bootstrap_delta(a, b, seed=k, n_boot=1000)
        excludes = d.ci_low > 0 or d.ci_high < 0
        # the same replicates decide both; they may part only within the (k+1)/(B+1) correction and the
        # quantile's interpolation, a few replicates either side of 0.05
        if abs(d.p - 0.05) > 0.005:
            assert (d.p < 0.05) == excludes, (d, k)


def test_q_values_by_hand():
    # m = 4 tests (NaN is not a test). Sorted p: .01 .03 .04 .20 -> p·m/rank: .04 .06 .0533 .20, then the running
    # minimum from the largest rank down: .04 .0533 .0533 .20
    q = stats.q_values([0.01, 0.04, 0.03, 0.20, math.nan])
    assert q[:4] == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.20], rel=1e-12)
    assert math.isnan(q[4])
    assert stats.q_values([]) == []


def test_mde_matches_a_simulated_power_curve():
    """At a true change equal to the MDE, the verdict's own test (the paired bootstrap CI excluding 0, here on
    uncorrelated baseline and trained values) detects it in about 80% of runs; at half the MDE far less often."""
    rng = np.random.default_rng(11)
    n, runs = 40, 300
    mdes = [stats.mde(rng.normal(size=n), seed=k, n_boot=500) for k in range(50)]
    m = float(np.mean(mdes))
    assert m == pytest.approx((1.959964 + 0.841621) * math.sqrt(2 / n), rel=0.1)

    def power(shift):
        hits = 0
        for k in range(runs):
            d = stats.paired_bootstrap_delta(rng.normal(size=n), rng.normal(loc=shift, size=n), seed=k, n_boot=500)
            hits += d.ci_low > 0 or d.ci_high < 0
        return hits / runs

    # binomial sd at p = 0.8 over 300 runs is 0.023; the bootstrap test is a little liberal at n = 40
    assert 0.72 <= power(m) <= 0.88
    assert power(m / 2) <= 0.45  # normal theory: 0.29


def test_mde_grows_with_the_seed_spread():
    x = np.random.default_rng(0).normal(size=30)
    base = stats.mde(x, seed=0)
    assert stats.mde(x, seed=0, seed_sd=0.3, n_seeds=3) > base
    assert stats.mde(x, seed=0, seed_sd=0.3, n_seeds=3) == pytest.approx(
        math.sqrt(base**2 + (1.959964 + 0.841621) ** 2 * 0.09 / 3), rel=1e-5)


def test_equivalence_and_verdicts_with_q():
    assert stats.equivalent(-0.02, 0.03, 0.05) and not stats.equivalent(-0.02, 0.08, 0.05)
    assert not stats.equivalent(math.nan, 0.01, 0.05)
    assert stats.verdict(0.01, 0.2, True, q=0.04) == Verdict.IMPROVED
    assert stats.verdict(0.01, 0.2, True, q=0.2) == Verdict.UNCLEAR  # significant alone, not across the run
    assert stats.verdict(0.01, 0.2, False, q=0.01) == Verdict.HARMED
    assert stats.verdict(-0.2, 0.2, True, q=0.01) == Verdict.UNCLEAR
