"""ODPO: DPO that asks for a larger log-ratio margin on pairs whose scores say the preference is stronger."""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dpolab.errors import ConfigError, TrainingError
from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output

_SHOWN = 10  # positions listed in an error before "..."

OFFSETS = ("log1p", "log")  # the scaling functions f of Δ = α·f(gap); the first is the default
DEFAULT_OFFSET = OFFSETS[0]


def odpo(
    lp: SequenceLogps,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    offset: str = DEFAULT_OFFSET,
    clamp: bool = False,
    min_gap: float = 1e-3,
) -> LossOutput:
    """DPO with an offset (Amini, Vieira & Cotterell 2024, "Direct Preference Optimization with an Offset",
    arXiv:2402.10571):

        loss = −log σ(β·h − Δ),  Δ = α·f(score_chosen − score_rejected),  f monotone increasing
        h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

    The paper leaves f open (any monotone increasing function) and uses f = log in its experiments; its authors'
    code (github.com/rycolab/odpo, trainers.py) takes the log of the raw reward difference. Their released
    sentiment and toxicity data score replies in [0, 2], so most gaps there are below 1 and log(gap) < 0 (65% and
    91% of the pairs of its test splits): on those pairs ODPO asks for *less* margin than DPO (at h = 0 its loss
    is below log 2).

    Default f = log1p, Δ = α·log(1 + gap): a member of the paper's family chosen so that the offset means what
    ODPO is for. Δ = 0 for a zero gap (exactly DPO), Δ > 0 for every positive gap (never less than DPO asks), and
    Δ grows with the gap, like log: log1p(g) = log(g) + log(1 + 1/g), within 0.1 of the paper's log(g) for gaps
    of 10 and more. The scale of the scores still sets the size of Δ, so a context that keeps scores for ODPO puts
    them in units where a meaningful gap is several units: detox in toxicity points, 100·(1 − toxicity) (a
    9-point gap gives Δ ≈ 2.3 at α = 1); length-biased-judge in tokens.
    At the reference (policy = reference, h = 0) the loss of a pair is log(1 + e^Δ) ≥ log 2, equal only at Δ = 0.

    beta: strength of the pull towards the reference.
    alpha: scale of the offset, ≥ 0; alpha = 0 is DPO exactly (on pairs that have scores).
    offset: f, "log1p" (default; Δ ≥ 0) or "log" (the authors' code, raw scale; Δ < 0 for gaps under 1).
    clamp: if False (default), a pair with score_chosen − score_rejected ≤ 0 is an error, since it usually means
        swapped or tied labels (and log(gap) is undefined); if True, such gaps are raised to min_gap.
    min_gap: the smallest gap used when clamp is True (> 0).
    Rewards: β·(log π(y) − log π_ref(y)).
    Raises TrainingError naming the batch positions of pairs without scores or with a non-positive gap.
    """
    check_positive("odpo", "beta", beta)
    check_positive("odpo", "min_gap", min_gap)
    check_offset(alpha=alpha, offset=offset)
    ratios = log_ratios(lp, loss="odpo")
    gap = _score_gap(lp, clamp=clamp, min_gap=min_gap).to(ratios.margin)  # (B,)
    losses = -F.logsigmoid(beta * ratios.margin - offset_values(gap, alpha=alpha, offset=offset))  # (B,)
    return reference_output(losses, ratios, beta=beta)


def check_offset(*, alpha: float, offset: str) -> None:
    """alpha ≥ 0 (a negative alpha would ask for less margin than DPO) and a known scaling function."""
    if offset not in OFFSETS:
        raise ConfigError(f"loss 'odpo': option offset must be one of {', '.join(OFFSETS)}, got {offset!r}")
    if not alpha >= 0:
        raise ConfigError(f"loss 'odpo': option alpha must be >= 0 (0 is DPO), got {alpha!r}")


def offset_values(gap: Tensor, *, alpha: float, offset: str = DEFAULT_OFFSET) -> Tensor:
    """Δ = α·f(gap) for positive score gaps, elementwise: the one formula the loss, offsets() and offset_summary()
    share."""
    f = torch.log1p if offset == "log1p" else torch.log
    return alpha * f(gap)  # (B,)


def offsets(score_chosen: Sequence[float], score_rejected: Sequence[float], *, alpha: float = 1.0,
            offset: str = DEFAULT_OFFSET) -> list[float]:
    """The offset ODPO asks of each pair, in float64, as the loss computes it; NaN for a pair whose gap is not
    positive (the loss refuses it unless clamp=True)."""
    check_offset(alpha=alpha, offset=offset)
    if len(score_chosen) != len(score_rejected):
        raise ValueError(f"{len(score_chosen)} chosen scores but {len(score_rejected)} rejected ones")
    gap = torch.tensor(score_chosen, dtype=torch.float64) - torch.tensor(score_rejected, dtype=torch.float64)
    positive = gap > 0  # (B,)
    values = offset_values(torch.where(positive, gap, torch.ones_like(gap)), alpha=alpha, offset=offset)  # (B,)
    return torch.where(positive, values, torch.full_like(values, math.nan)).tolist()


def offset_summary(gaps: Sequence[float], *, alpha: float = 1.0, offset: str = DEFAULT_OFFSET) -> dict[str, float | int | str | None]:
    """What ODPO would ask of a context's pairs, for the info saved beside them and the report: the score gaps and
    the offsets Δ they give at `alpha` (min, median, max), how many offsets are negative and their share (pairs
    where ODPO asks for less margin than DPO; none with f = log1p), how many gaps are not positive (the loss
    refuses them), and the mean loss at the reference, mean log(1 + e^Δ) (DPO's is log 2 ≈ 0.693)."""
    check_offset(alpha=alpha, offset=offset)
    positive = [float(g) for g in gaps if g > 0]
    out: dict[str, float | int | str | None] = {"pairs": len(gaps), "offset": offset, "alpha": alpha,
                                                "non_positive_gaps": len(gaps) - len(positive)}
    if not positive:
        return {**out, "gap_min": None, "gap_median": None, "gap_max": None, "offset_min": None,
                "offset_median": None, "offset_max": None, "negative_offsets": 0, "negative_share": None,
                "initial_loss_mean": None}
    delta = offset_values(torch.tensor(positive, dtype=torch.float64), alpha=alpha, offset=offset)  # (P,)
    off = delta.tolist()
    negative = sum(o < 0 for o in off)
    return {**out, "gap_min": min(positive), "gap_median": statistics.median(positive), "gap_max": max(positive),
            "offset_min": min(off), "offset_median": statistics.median(off), "offset_max": max(off),
            "negative_offsets": negative, "negative_share": negative / len(off),
            "initial_loss_mean": float(F.softplus(delta).mean())}


def _score_gap(lp: SequenceLogps, *, clamp: bool, min_gap: float) -> Tensor:
    """score_chosen − score_rejected per pair, checked; scores are data, so no gradient flows into them."""
    if lp.score_chosen is None or lp.score_rejected is None:
        raise TrainingError(
            f"loss 'odpo' needs quality scores (score_chosen, score_rejected) for every pair; none of the {len(lp)} "
            "pairs in this batch has them (a batch loses its scores if any pair lacks one). "
            "Add scores to the data or choose a loss that does not use them, such as 'dpo'"
        )
    gap = (lp.score_chosen - lp.score_rejected).detach()  # (B,)
    missing = ~torch.isfinite(gap)  # (B,) NaN marks a pair without a score
    if missing.any():
        raise TrainingError(
            f"loss 'odpo': {int(missing.sum())} of {len(lp)} pairs have a missing or non-finite score "
            f"(batch positions {_positions(missing)}); every pair needs finite score_chosen and score_rejected"
        )
    not_positive = gap <= 0  # (B,)
    if not_positive.any():
        if not clamp:
            raise TrainingError(
                f"loss 'odpo': {int(not_positive.sum())} of {len(lp)} pairs have score_chosen - score_rejected <= 0 "
                f"(batch positions {_positions(not_positive)}), which usually means swapped or tied labels (and "
                f"log(gap) is undefined); the chosen should score higher. Fix the scores, or set the odpo option clamp=True to raise such gaps to min_gap={min_gap}"
            )
        gap = gap.clamp_min(min_gap)  # (B,)
    return gap


def _positions(mask: Tensor) -> str:
    idx = torch.nonzero(mask).flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:_SHOWN])
    return shown + (f", ... ({len(idx) - _SHOWN} more)" if len(idx) > _SHOWN else "")
