"""Statistics: seeded percentile bootstrap over items (confidence intervals for one model, paired deltas between two)
and the verdict a delta earns.

Resampling is over items (prompts, questions), never over samples within an item: the samples of one item are
correlated, and for sampled generation the item-to-item spread dominates (Efron & Tibshirani 1993, ch. 13,
percentile interval). NaN marks an item where a metric is undefined (e.g. a flip rate for an item that was
never in the flip's denominator); it is dropped before resampling.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np


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
    NaN where the metric is undefined for that item under that model. Each resample draws item indices once and
    reduces each side over its defined entries, so subset metrics (flip rates) stay paired.
    """
    xa = np.asarray(a, dtype=float)
    xb = np.asarray(b, dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired values must align item by item; got {xa.size} and {xb.size}")
    keep = ~(np.isnan(xa) & np.isnan(xb))
    xa, xb = xa[keep], xb[keep]
    n = xa.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # (n_boot, n)
    agg = AGGREGATES[statistic]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN resample of a subset metric
        deltas = agg(xb[idx], axis=1) - agg(xa[idx], axis=1)  # (n_boot,)
    deltas = deltas[~np.isnan(deltas)]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(deltas, [alpha, 1.0 - alpha]) if deltas.size else (math.nan, math.nan)
    return Interval(aggregate(xb, statistic) - aggregate(xa, statistic), float(lo), float(hi), int(n))


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


def verdict(delta_ci_low: float, delta_ci_high: float, higher_is_better: bool) -> Verdict:
    """improved / harmed when the 95% CI of the change excludes zero, in the metric's good / bad direction."""
    if any(x is None or math.isnan(x) for x in (delta_ci_low, delta_ci_high)):
        return Verdict.UNCLEAR
    if delta_ci_low > 0:
        return Verdict.IMPROVED if higher_is_better else Verdict.HARMED
    if delta_ci_high < 0:
        return Verdict.HARMED if higher_is_better else Verdict.IMPROVED
    return Verdict.UNCLEAR
