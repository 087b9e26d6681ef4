"""IPO: regress the per-token log-ratio margin onto a fixed target instead of pushing it to infinity."""
from __future__ import annotations

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def ipo(lp: SequenceLogps, *, beta: float = 0.1) -> LossOutput:
    """IPO, Eq. 17 (Azar et al. 2023, arXiv:2310.12036), with τ = beta:

        loss = (h − 1/(2β))²,  h = (log π(y_w) − log π_ref(y_w))/|y_w| − (log π(y_l) − log π_ref(y_l))/|y_l|

    Each log-ratio is averaged per token (|y| = completion tokens), as TRL does: with summed log-ratios
    the fixed target 1/(2β) would mean a different per-token pull for short and long completions.

    beta: IPO's regularisation τ; larger stays closer to the reference (target margin 1/(2β) is smaller).
    Rewards: β·(log π(y) − log π_ref(y)), summed as for every reference-based loss, so they compare
        across losses; note they are not the per-token quantities the loss regresses.
    """
    check_positive("ipo", "beta", beta)
    ratios = log_ratios(lp, loss="ipo")
    h = ratios.chosen / lp.chosen_tokens - ratios.rejected / lp.rejected_tokens  # (B,)
    losses = (h - 1 / (2 * beta)) ** 2  # (B,)
    return reference_output(losses, ratios, beta=beta)
