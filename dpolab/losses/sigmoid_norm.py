"""Length-normalised DPO: sigmoid DPO on log-ratios averaged per token."""
from __future__ import annotations

import torch.nn.functional as F

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def sigmoid_norm(lp: SequenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Length-normalised DPO, Eq. 6 of the Tülu 3 report (Lambert et al. 2024, arXiv:2411.15124, Sec. 5.1.2; the
    normalisation is SimPO's, arXiv:2405.14734, kept here with the reference):

        loss = −log σ(β·h̄),  h̄ = (log π(y_w) − log π_ref(y_w))/|y_w| − (log π(y_l) − log π_ref(y_l))/|y_l|

    |y| = completion tokens, as in `ipo`. A long completion no longer dominates the margin by its length.

    As TRL 1.16 (`loss_type="sigmoid_norm"`), with TRL's default β = 0.1; per-token margins are much smaller
    than summed ones, so Tülu 3 trains it with β = 5.

    beta: strength of the pull towards the reference, on per-token log-ratios.
    Rewards: β·(log π(y) − log π_ref(y)), summed as for every reference-based loss (not the per-token margin).
    """
    check_positive("sigmoid_norm", "beta", beta)
    ratios = log_ratios(lp, loss="sigmoid_norm")
    h = ratios.chosen / lp.chosen_tokens - ratios.rejected / lp.rejected_tokens  # (B,)
    return reference_output(-F.logsigmoid(beta * h), ratios, beta=beta)
