"""APO-down: anchored; lower both likelihoods against the reference, the rejected's more."""
from __future__ import annotations

import torch

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def apo_down(lp: SequenceLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-down, Eq. 8 (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266):

        loss = σ(r_w) + (1 − σ(r_w − r_l)),  r = β·(log π(y) − log π_ref(y))

    The first term lowers the chosen's likelihood, the second keeps the rejected below it: for chosen
    completions worse than the model's own outputs. Computed as σ(r_w) + σ(r_l − r_w).

    As TRL 1.16 (`loss_type="apo_down"`).

    beta: scale of the reward, as in DPO.
    Rewards: r = β·(log π(y) − log π_ref(y)).
    """
    check_positive("apo_down", "beta", beta)
    ratios = log_ratios(lp, loss="apo_down")
    losses = torch.sigmoid(beta * ratios.chosen) + torch.sigmoid(-beta * ratios.margin)  # (B,)
    return reference_output(losses, ratios, beta=beta)
