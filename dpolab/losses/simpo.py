"""SimPO: reference-free, the per-token average log-prob as the reward, with a target margin."""
from __future__ import annotations

import torch.nn.functional as F

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, reference_free


@reference_free
def simpo(lp: SequenceLogps, *, beta: float = 2.0, gamma: float = 1.0) -> LossOutput:
    """SimPO, Eq. 6 (Meng, Xia & Chen 2024, arXiv:2405.14734):

        loss = −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ)

    No reference model: ref_chosen / ref_rejected are ignored even when given.

    beta: scale of the reward; SimPO uses larger values than DPO (2 to 10).
    gamma: target reward margin; the loss keeps pushing until the reward gap exceeds it well.
    Rewards: β/|y|·log π(y), SimPO's implicit reward.
    """
    check_positive("simpo", "beta", beta)
    chosen_rewards = beta * lp.chosen / lp.chosen_tokens  # (B,)
    rejected_rewards = beta * lp.rejected / lp.rejected_tokens  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)  # (B,)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach())
