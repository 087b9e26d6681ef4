"""R-DPO: DPO with a length term, so the length difference of a pair explains part of its preference."""
from __future__ import annotations

import torch.nn.functional as F

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def rdpo(lp: SequenceLogps, *, beta: float = 0.1, alpha: float = 0.05) -> LossOutput:
    """Length-regularised DPO (R-DPO, Park, Rafailov, Ermon & Finn 2024, arXiv:2403.19159; the same
    length margin as iLR-DPO, Liu et al. 2024, arXiv:2406.11817):

        loss = −log σ(β·h + α·(|y_w| − |y_l|))
        h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)),  |y| = completion tokens

    Sign: R-DPO maximises reward − α·|y| under DPO's KL constraint, so the true reward is
    β·log-ratio + α·|y| and the length term enters the sigmoid with a plus. A longer chosen then already
    "explains" part of the preference and the policy is pushed less to favour length; a minus sign would
    reward verbosity. alpha = 0 is DPO.

    beta: strength of the pull towards the reference.
    alpha: length penalty per token, in the same units as β·log-ratio; larger gives shorter answers.
    Rewards: β·(log π(y) − log π_ref(y)), without the length term, so they compare with DPO's.
    """
    check_positive("rdpo", "beta", beta)
    ratios = log_ratios(lp, loss="rdpo")
    length_gap = lp.chosen_tokens - lp.rejected_tokens  # (B,)
    losses = -F.logsigmoid(beta * ratios.margin + alpha * length_gap)  # (B,)
    return reference_output(losses, ratios, beta=beta)
