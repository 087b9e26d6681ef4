"""ODPO: DPO that asks for a larger log-ratio margin on pairs whose scores say the preference is stronger."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpolab.errors import TrainingError
from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output

_SHOWN = 10  # positions listed in an error before "..."


def odpo(
    lp: SequenceLogps,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    clamp: bool = False,
    min_gap: float = 1e-3,
) -> LossOutput:
    """DPO with an offset (Amini, Vieira & Cotterell 2024, arXiv:2402.10571), offset Δ = α·log(score gap):

        loss = −log σ(β·h − Δ),  Δ = α·log(score_chosen − score_rejected)
        h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

    A gap > 1 gives a positive offset (the margin must exceed it), a gap < 1 a negative one; alpha = 0 is DPO.

    beta: strength of the pull towards the reference.
    alpha: scale of the offset.
    clamp: if False (default), a pair with score_chosen − score_rejected ≤ 0 is an error, since its log
        is undefined and usually means swapped or tied labels; if True, such gaps are raised to min_gap.
    min_gap: the smallest gap used when clamp is True (> 0).
    Rewards: β·(log π(y) − log π_ref(y)).
    Raises TrainingError naming the batch positions of pairs without scores or with a non-positive gap.
    """
    check_positive("odpo", "beta", beta)
    check_positive("odpo", "min_gap", min_gap)
    ratios = log_ratios(lp, loss="odpo")
    gap = _score_gap(lp, clamp=clamp, min_gap=min_gap).to(ratios.margin)  # (B,)
    offset = alpha * torch.log(gap)  # (B,)
    losses = -F.logsigmoid(beta * ratios.margin - offset)  # (B,)
    return reference_output(losses, ratios, beta=beta)


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
                f"(batch positions {_positions(not_positive)}), so log(gap) is undefined; the chosen should score "
                f"higher. Fix the scores, or set the odpo option clamp=True to raise such gaps to min_gap={min_gap}"
            )
        gap = gap.clamp_min(min_gap)  # (B,)
    return gap


def _positions(mask: Tensor) -> str:
    idx = torch.nonzero(mask).flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:_SHOWN])
    return shown + (f", ... ({len(idx) - _SHOWN} more)" if len(idx) > _SHOWN else "")
