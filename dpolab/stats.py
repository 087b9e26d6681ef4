"""Statistics: seeded percentile bootstrap over items (confidence intervals for one model, paired deltas between two),
intervals pooled over training seeds, q-values across a run's comparisons, the minimum detectable effect, and the
verdict a change earns.

Resampling is over items (prompts, questions), never over samples within an item: the samples of one item are
correlated, and for sampled generation the item-to-item spread dominates (Efron & Tibshirani 1993, ch. 13,
percentile interval). NaN marks an item where a metric is undefined (e.g. a flip rate for an item that was
never in the flip's denominator); it is dropped before resampling, and a paired delta uses only the items where
both models define the metric (so a flip rate is compared on the same items before and after training).

Below MIN_ITEMS items no interval is given: the percentile interval of a mean over 5 items covers the truth 84% of
the time for normal data and 80% for a Bernoulli(0.3) at a nominal 95% (simulated, 1000 runs each); at 10 items
it is 90% and 96%.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

MIN_ITEMS = 10  # fewer items than this: a value, but no interval, p-value or verdict (see the module docstring)


def _p90(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.nanpercentile(x, 90, axis=axis)


def _exp_mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    # perplexity = exp(mean per-token NLL); items are equal-length chunks, so the mean of chunk NLLs is the
    # per-token mean
    return np.exp(np.nanmean(x, axis=axis))


# How per-item values reduce to a metric; every Metric names one, so a delta can be recomputed on resamples.
AGGREGATES: dict[str, Callable[..., np.ndarray]] = {
    "mean": np.nanmean,
    "median": np.nanmedian,
    "p90": _p90,
    "exp_mean": _exp_mean,
}


@dataclass(frozen=True)
class Interval:
    value: float
    ci_low: float
    ci_high: float
    n: int  # items that entered (NaN dropped)
    p: float = math.nan  # two-sided p-value of "no change" (deltas only)


def aggregate(values: Sequence[float], statistic: str = "mean") -> float:
    """The metric value of per-item values under a named statistic (see AGGREGATES); NaN if no item counts."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan
    return float(AGGREGATES[statistic](x[None, :], axis=1)[0])


def bootstrap_ci(
    values: Sequence[float], *, seed: int, n_boot: int = 2000, statistic: str = "mean", level: float = 0.95
) -> Interval:
    """Percentile bootstrap interval of `statistic` over items.

    values: one number per item; NaN entries are dropped.
    seed: seeds numpy's generator, so the same values give the same interval.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if x.size < MIN_ITEMS:
        return Interval(aggregate(x, statistic), math.nan, math.nan, int(x.size))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))  # (n_boot, n)
    stats = AGGREGATES[statistic](x[idx], axis=1)  # (n_boot,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(aggregate(x, statistic), float(lo), float(hi), int(x.size))


def paired_bootstrap_delta(
    a: Sequence[float],
    b: Sequence[float],
    *,
    seed: int,
    n_boot: int = 2000,
    statistic: str = "mean",
    level: float = 0.95,
) -> Interval:
    """Interval for statistic(b) - statistic(a), resampling the same items for both (a paired bootstrap).

    a, b: per-item values aligned by item (a[i] and b[i] are the same item, e.g. baseline and trained model);
    NaN where the metric is undefined for that item under that model. Only items defined under both enter (a
    flip rate is compared on the items both models got right at first); each resample draws item indices once.
    p: the percentile bootstrap's two-sided p-value, 2·min(P*(Δ ≤ 0), P*(Δ ≥ 0)) with the (k+1)/(B+1)
    correction; it is below 1 − level when the interval excludes 0, up to that correction and the quantile's
    interpolation (a few replicates).
    """
    xa, xb = _paired(a, b)
    n = xa.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    value = aggregate(xb, statistic) - aggregate(xa, statistic)
    if n < MIN_ITEMS:
        return Interval(value, math.nan, math.nan, int(n))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # (n_boot, n)
    agg = AGGREGATES[statistic]
    deltas = agg(xb[idx], axis=1) - agg(xa[idx], axis=1)  # (n_boot,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(deltas, [alpha, 1.0 - alpha])
    return Interval(value, float(lo), float(hi), int(n), bootstrap_p(deltas))


def fraction_of_change(a: Sequence[float], b: Sequence[float], c: Sequence[float], *, seed: int, n_boot: int = 2000,
                       level: float = 0.95) -> Interval:
    """How much of the change a -> b the change a -> c reproduces: (mean c − mean a) / (mean b − mean a), with a
    percentile bootstrap over items drawn once for all three (an intervention's effect as a fraction of training's).

    a, b, c: item-aligned per-item values (the base model, the trained one, the base under an intervention); only
    items defined in all three enter. The ratio is unstable when b barely differs from a: replicates whose
    denominator is 0 are dropped, and a wide interval is the honest answer then.
    """
    xa, xb, xc = (np.asarray(v, dtype=float) for v in (a, b, c))
    if not xa.shape == xb.shape == xc.shape:
        raise ValueError("the three models' values must align item by item")
    keep = ~(np.isnan(xa) | np.isnan(xb) | np.isnan(xc))
    xa, xb, xc = xa[keep], xb[keep], xc[keep]
    n = int(xa.size)
    denominator = xb.mean() - xa.mean() if n else 0.0
    value = float((xc.mean() - xa.mean()) / denominator) if n and denominator != 0 else math.nan
    if n < MIN_ITEMS:
        return Interval(value, math.nan, math.nan, n)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # (n_boot, n)
    da, db, dc = xa[idx].mean(1), xb[idx].mean(1), xc[idx].mean(1)
    ok = db != da
    reps = (dc[ok] - da[ok]) / (db[ok] - da[ok])  # (kept replicates,)
    if reps.size == 0:
        return Interval(value, math.nan, math.nan, n)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return Interval(value, float(lo), float(hi), n)


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The entries of two item-aligned vectors where both are defined."""
    xa = np.asarray(a, dtype=float)
    xb = np.asarray(b, dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired values must align item by item; got {xa.size} and {xb.size}")
    keep = ~(np.isnan(xa) | np.isnan(xb))
    return xa[keep], xb[keep]


def bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided p-value of "no change" from bootstrap replicates of a change (see paired_bootstrap_delta)."""
    b = deltas.size
    below = (int(np.sum(deltas <= 0)) + 1) / (b + 1)
    above = (int(np.sum(deltas >= 0)) + 1) / (b + 1)
    return min(1.0, 2.0 * min(below, above))


@dataclass(frozen=True)
class Pooled:
    """A change pooled over training seeds: the mean of the seeds' changes, its interval and p-value, and each
    seed's own change (for the report's per-seed points)."""

    interval: Interval
    seed_deltas: tuple[float, ...]
    se_items: float  # standard error from the items (bootstrap, items shared by every seed)
    se_seeds: float  # standard error from the spread between seeds (0 for one seed)
    df: float  # degrees of freedom of the t interval (inf for one seed: the percentile bootstrap is used)


def seed_pooled_delta(
    a: Sequence[float] | Sequence[Sequence[float]] | None,
    bs: Sequence[Sequence[float]],
    *,
    seed: int,
    n_boot: int = 2000,
    statistic: str = "mean",
    level: float = 0.95,
) -> Pooled:
    """The change statistic(b_s) − statistic(a) averaged over training seeds s, with a two-level interval.

    a: the baseline's per-item values, shared by every seed; or one vector per seed (a placebo trained with the
        same seed); or None for the interval of the seeds' own mean value rather than a change.
    bs: one item-aligned vector per training seed, on the same items as `a` (NaN where undefined).

    With one seed this is paired_bootstrap_delta (bootstrap_ci for a = None). With S ≥ 2 the variance has two
    sources, and both are estimated: the items, by a bootstrap that draws one set of item indices per replicate
    and applies it to every seed (every seed is evaluated on the same test items, so items are crossed with seeds,
    not nested in them: drawing items afresh within each seed loses the item variance the seeds share and
    under-covers), and the seeds, by the spread of the S per-seed changes, var(Δ_s)/S. Each term also holds the
    seed × item noise, so their sum is slightly conservative. Three seeds are too few for a seed-level bootstrap (a
    percentile interval over 3 resampled seeds misses the truth at least 25% of the time when seeds dominate), so
    the interval is Δ ± t·se with Welch–Satterthwaite degrees of freedom, and p is that t test's.
    tests/test_stats.py checks the coverage on simulated runs with a known between-seed variance.
    """
    from scipy import stats as sps  # imported on use: scipy.stats takes half a second to import

    seeds = [np.asarray(b, dtype=float) for b in bs]
    if not seeds:
        raise ValueError("no seeds to pool")
    if a is None:
        bases: list[np.ndarray | None] = [None] * len(seeds)
    else:
        arr = np.asarray(a, dtype=float)
        bases = [arr] * len(seeds) if arr.ndim == 1 else list(arr)
        if len(bases) != len(seeds) or any(x.shape != b.shape for x, b in zip(bases, seeds)):
            raise ValueError("the baseline's values must align item by item with every seed's")
    agg = AGGREGATES[statistic]
    pairs = []  # per seed: (a or None, b), NaN wherever either side is undefined
    for base, b in zip(bases, seeds):
        undefined = np.isnan(b) if base is None else np.isnan(base) | np.isnan(b)
        pairs.append((None if base is None else np.where(undefined, np.nan, base), np.where(undefined, np.nan, b)))
    deltas = tuple(float(_delta(pa, pb, statistic)) for pa, pb in pairs)
    n = int(max(int(np.sum(~np.isnan(pb))) for _, pb in pairs))
    value = math.nan if any(math.isnan(d) for d in deltas) else float(np.mean(deltas))
    if len(seeds) == 1:
        if bases[0] is None:
            iv = bootstrap_ci(seeds[0], seed=seed, n_boot=n_boot, statistic=statistic, level=level)
        else:
            iv = paired_bootstrap_delta(bases[0], seeds[0], seed=seed, n_boot=n_boot, statistic=statistic, level=level)
        se = (iv.ci_high - iv.ci_low) / (2 * sps.norm.ppf(0.5 + level / 2))
        return Pooled(iv, deltas, float(se), 0.0, math.inf)
    if n < MIN_ITEMS or math.isnan(value):
        return Pooled(Interval(value, math.nan, math.nan, n), deltas, math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, seeds[0].size, size=(n_boot, seeds[0].size))  # (n_boot, items): shared by every seed
    reps = np.zeros(n_boot)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample that leaves a subset metric no item
        for pa, pb in pairs:
            reps += agg(pb[idx], axis=1) - (0.0 if pa is None else agg(pa[idx], axis=1))  # (n_boot,)
    reps = reps[~np.isnan(reps)] / len(pairs)
    se_items = float(np.std(reps, ddof=1))
    se_seeds = float(np.std(deltas, ddof=1) / math.sqrt(len(deltas)))
    se = math.hypot(se_items, se_seeds)
    df = _satterthwaite([(se_items, n - 1), (se_seeds, len(deltas) - 1)])
    if se == 0:
        return Pooled(Interval(value, value, value, n, 1.0 if value == 0 else 0.0), deltas, 0.0, 0.0, df)
    t = float(sps.t.ppf(0.5 + level / 2, df))
    p = float(2 * sps.t.sf(abs(value) / se, df))
    return Pooled(Interval(value, value - t * se, value + t * se, n, p), deltas, se_items, se_seeds, df)


def _delta(a: np.ndarray | None, b: np.ndarray, statistic: str) -> float:
    """statistic(b) − statistic(a), or statistic(b) alone for a = None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return aggregate(b, statistic) - (0.0 if a is None else aggregate(a, statistic))


def _satterthwaite(parts: list[tuple[float, float]]) -> float:
    """Degrees of freedom of a sum of variance estimates se_i² each with df_i (Welch–Satterthwaite)."""
    num = sum(se**2 for se, _ in parts) ** 2
    den = sum(se**4 / df for se, df in parts if df > 0 and se > 0)
    return num / den if den > 0 else math.inf


def q_values(p: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg q-values (the smallest false discovery rate at which each test is a discovery); NaN
    p-values stay NaN and don't count as tests. BH controls the FDR for independent or positively dependent
    tests (Benjamini & Yekutieli 2001), which metrics of one model mostly are."""
    from scipy import stats as sps  # imported on use: scipy.stats takes half a second to import

    x = np.asarray(p, dtype=float)
    out = np.full(x.shape, np.nan)
    ok = ~np.isnan(x)
    if ok.any():
        out[ok] = sps.false_discovery_control(x[ok], method="bh")
    return [float(v) for v in out]


def mde(values: Sequence[float], *, seed: int, n_boot: int = 2000, statistic: str = "mean", alpha: float = 0.05,
        power: float = 0.8, seed_sd: float = 0.0, n_seeds: int = 1) -> float:
    """The minimum detectable effect: the smallest true change a two-sided test at `alpha` detects with
    probability `power`, at these items:

        MDE = (z_{1−α/2} + z_{power}) · sqrt(2·SE² + seed_sd²/n_seeds)

    SE is the bootstrap standard error of the statistic over the baseline's items (for a mean, sd/√n); the factor
    2 is the variance of a difference of two such measurements taken as uncorrelated, which is conservative for a
    paired design where training leaves most items as they were. seed_sd: the spread of a change between training
    seeds, when several were run. NaN below MIN_ITEMS items. tests/test_stats.py checks it against a simulated
    power curve of the verdict's own test.
    """
    from scipy import stats as sps  # imported on use: scipy.stats takes half a second to import

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size < MIN_ITEMS:
        return math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    se = float(np.std(AGGREGATES[statistic](x[idx], axis=1), ddof=1))
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return float(z * math.sqrt(2 * se**2 + seed_sd**2 / max(n_seeds, 1)))


def equivalent(ci_low: float, ci_high: float, bound: float) -> bool:
    """Whether a change's interval lies inside ±bound (an equivalence test at the interval's level: "stays near
    the baseline" means this, with the MDE as the bound)."""
    if any(x is None or math.isnan(x) for x in (ci_low, ci_high, bound)):
        return False
    return -bound <= ci_low and ci_high <= bound


@dataclass(frozen=True)
class Aligned:
    item_ids: list[str]
    a: list[float]
    b: list[float]


def align(a: dict[str, float], b: dict[str, float]) -> Aligned:
    """Item ids in the union of two {item_id: value} maps, with NaN where one side lacks the item."""
    ids = sorted(set(a) | set(b))
    return Aligned(ids, [a.get(i, math.nan) for i in ids], [b.get(i, math.nan) for i in ids])



class Verdict(str, Enum):
    """What a change did to a behaviour; the value is how results.parquet and the report spell it."""

    IMPROVED = "improved"
    HARMED = "harmed"
    UNCLEAR = "no clear change"

    __hash__ = str.__hash__  # a key lookup by the plain string ("improved") finds the member, on every Python

    def __str__(self) -> str:
        return self.value


FDR = 0.05  # the false discovery rate verdicts are called at


def verdict(delta_ci_low: float, delta_ci_high: float, higher_is_better: bool, q: float | None = None) -> Verdict:
    """improved / harmed when the 95% CI of the change excludes zero, in the metric's good / bad direction; given a
    q-value, the change must also be a discovery at FDR (q ≤ 0.05)."""
    if any(x is None or math.isnan(x) for x in (delta_ci_low, delta_ci_high)):
        return Verdict.UNCLEAR
    if q is not None and not (q <= FDR):
        return Verdict.UNCLEAR
    if delta_ci_low > 0:
        return Verdict.IMPROVED if higher_is_better else Verdict.HARMED
    if delta_ci_high < 0:
        return Verdict.HARMED if higher_is_better else Verdict.IMPROVED
    return Verdict.UNCLEAR
