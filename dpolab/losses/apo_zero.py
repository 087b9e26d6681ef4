"""APO-zero: anchored; raise the chosen's likelihood and lower the rejected's, each against the reference."""
from __future__ import annotations

import torch

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def apo_zero(lp: SequenceLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-zero, Eq. 7 (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266):

        loss = (1 − σ(r_w)) + σ(r_l),  r = β·(log π(y) − log π_ref(y))

    Anchored: each completion is pushed against its own reference likelihood, the chosen up and the rejected
    down, not only their difference. For chosen completions better than the model's own outputs. Computed as
    σ(−r_w) + σ(r_l) (1 − σ(x) = σ(−x), without cancellation).

    As TRL 1.16 (`loss_type="apo_zero"`).

    beta: scale of the reward, as in DPO.
    Rewards: r = β·(log π(y) − log π_ref(y)).
    """
    check_positive("apo_zero", "beta", beta)
    ratios = log_ratios(lp, loss="apo_zero")
    losses = torch.sigmoid(-beta * ratios.chosen) + torch.sigmoid(beta * ratios.rejected)  # (B,)
    return reference_output(losses, ratios, beta=beta)
