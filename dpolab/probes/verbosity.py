"""Verbosity: greedy replies to general instructions, measured in tokens.

Length is the behaviour DPO is known to inflate (Park et al. 2024, arXiv:2403.19159; iLR-DPO, arXiv:2406.11817),
so it is reported on its own.

Censoring. A reply cut off at the token limit has an unknown true length of at least the limit. On the embedded
SmolLM2-135M-Instruct (greedy, all 102 test instructions) 45% of replies reach 256 tokens and 32% still reach 512
and 768: every reply that ends does so by 360 tokens, and every reply still running at 512 is a loop
(`repetition` >= 0.55) that runs to any limit. No limit brings the cut share to 5%; 512 (the default) leaves
only loops cut and gives the replies that end room to grow by 40% or more. The lengths are therefore reported
with measures that stay valid under censoring, each computed on min(length, limit), one value per instruction:

- median_tokens (the headline): the Kaplan–Meier median. With one common censoring point it is the sample median
  of the capped lengths while fewer than half the replies are cut (exact: the cut ones are all above it); with
  half or more cut the true median is at least the limit and the value is the limit (info "median_censored").
  A median ignores how long the loops would have run, which a mean cannot.
- frac_over_64, frac_over_128, ...: the share of replies longer than each threshold below the limit: exact,
  since a cut reply is known to exceed them.
- mean_tokens: the restricted mean, the mean of min(length, limit) (Irwin's restricted mean): a well-defined
  estimand, but with a third of the replies loops counted at the limit, a loop begun or ended moves it as much as
  a reply lengthened; it is no longer the headline.
- p90_tokens: the 90th percentile of the capped lengths: exact while under 10% are cut, otherwise the limit or
  a lower bound (info "p90_censored").
- frac_hit_limit: the cut share, shown beside every length.
- frac_repetitive: replies that are loops or replay long spans of themselves (`is_repetitive`), so a "longer"
  that is only looping is visible; each record carries its `repetition` score and `repetitive` flag.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpolab.models.chat import ChatModel
from dpolab.scorers import REPETITIVE, repetition
from dpolab.probes.base import EvalContext, Headline, MetricTable, ProbeResult, ProbeSpec
from dpolab.banks import Instruction, asset, bank_split, read_jsonl, spread


THRESHOLDS = (64, 128, 256, 512)  # frac_over_T for each T below the limit

# -- lengths under censoring ----------------------------------------------------------------------------------


def thresholds(limit: int) -> list[int]:
    """The T of the frac_over_T metrics: the fixed THRESHOLDS below the limit (a cut reply exceeds only those)."""
    return [t for t in THRESHOLDS if t < limit]


def capped(lengths: Sequence[int], limit: int) -> list[float]:
    """min(length, limit): what the length metrics are computed on (a cut reply counts as the limit)."""
    return [float(min(n, limit)) for n in lengths]


def censored_quantile(lengths: Sequence[int], hit: Sequence[bool], limit: int, q: float) -> tuple[float, bool]:
    """The q-quantile of lengths all censored at `limit` (hit: cut at it), and whether it is censored.

    Computed as the quantile of the capped lengths (numpy's linear interpolation, as stats.AGGREGATES). It is exact
    when the order statistics it interpolates are all uncut (cut replies are the longest); otherwise the true value
    is at least the returned one, and censored is True.
    """
    n = len(lengths)
    if n == 0:
        return float("nan"), False
    pos = q * (n - 1)
    top = math.ceil(pos)  # the highest order statistic (0-based) the interpolation reads
    return float(np.percentile(capped(lengths, limit), 100 * q)), top >= n - sum(map(bool, hit))


def censored_median(lengths: Sequence[int], hit: Sequence[bool], limit: int) -> tuple[float, bool]:
    """The Kaplan–Meier median of lengths all censored at `limit` (hit: cut at it), and whether it is censored.

    With one common censoring point the KM curve equals the empirical one below the limit, so the KM median is the
    sample median of the capped lengths while fewer than half are cut. With half or more cut it is at least the
    limit: returned as the median of the capped lengths (the limit, or with exactly half cut the midpoint of the
    last uncut length and the limit), with censored=True.
    """
    return censored_quantile(lengths, hit, limit, 0.5)


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_instructions: test instructions. max_new_tokens: the limit; hitting it counts as cut off (512: see the
    module docstring). instructions: a JSONL of {"id","instruction"} replacing the shipped bank's test split.
    """

    n_instructions: int | None = 32  # one generate batch at the default --batch-size
    max_new_tokens: int = 512
    instructions: str | None = None


def run(model: ChatModel, ctx: EvalContext, options: Options) -> ProbeResult:
    rows = (read_jsonl(options.instructions, Instruction) if options.instructions
            else bank_split(read_jsonl(asset("instructions.jsonl"), Instruction), "test"))
    rows = spread(rows, ctx.size(options.n_instructions), seed=ctx.seed)
    task = ctx.progress.task(f"verbosity: {len(rows)} instructions", total=1)
    replies = model.generate([[{"role": "user", "content": r.instruction}] for r in rows],
                             max_new_tokens=options.max_new_tokens)
    task.advance()
    limit = options.max_new_tokens
    over = thresholds(limit)
    hit = [bool(g.hit_limit) for g in replies]
    cut = sum(hit)
    lengths = [g.n_tokens for g in replies]
    _, median_censored = censored_median(lengths, hit, limit)
    _, p90_censored = censored_quantile(lengths, hit, limit, 0.9)

    table = MetricTable()
    table.declare("median_tokens", higher_is_better=False, aggregate="median")  # the headline: KM median
    table.declare("mean_tokens", higher_is_better=False)  # restricted mean
    table.declare("p90_tokens", higher_is_better=False, aggregate="p90")
    for t in over:
        table.declare(f"frac_over_{t}", higher_is_better=False)
    table.declare("frac_hit_limit", higher_is_better=False)
    table.declare("frac_repetitive", higher_is_better=False)
    records: list[dict[str, Any]] = []
    for r, g, h in zip(rows, replies, hit):
        length = min(g.n_tokens, limit)
        for name in ("median_tokens", "mean_tokens", "p90_tokens"):
            table.add(name, r.id, length)
        for t in over:
            table.add(f"frac_over_{t}", r.id, float(g.n_tokens > t))
        table.add("frac_hit_limit", r.id, float(h))
        rep = repetition(g.text)
        table.add("frac_repetitive", r.id, float(rep >= REPETITIVE))
        records.append({"item_id": r.id, "instruction": r.instruction, "reply": g.text,
                        "reply_tokens": g.n_tokens, "hit_limit": h, "repetition": rep,
                        "repetitive": rep >= REPETITIVE})
    info = {"instructions": len(rows), "max_new_tokens": limit, "cut": cut, "headline": "median_tokens",
            "median_censored": median_censored, "p90_censored": p90_censored,
            "length_measure": "lengths capped at max_new_tokens; median_tokens is the Kaplan-Meier median (the limit "
                              "when half or more are cut: median_censored); frac_over_T exact for T below the limit; "
                              "mean_tokens the restricted mean"}
    return table.result("verbosity", records=records, info=info, seed=ctx.seed, n_boot=ctx.n_boot)


PROBE = ProbeSpec(
    name="verbosity", options=Options, run=run, report="verbosity",
    summary="reply length to general instructions",
    headlines=(Headline("reply length (tokens, median; Kaplan–Meier under the limit)", "median_tokens", False),),
    quick={"n_instructions": 6, "max_new_tokens": 64},
)
