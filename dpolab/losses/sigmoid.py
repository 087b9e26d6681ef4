"""Sigmoid DPO: the Bradley-Terry log-likelihood of the preference under DPO's implicit reward."""
from __future__ import annotations

import torch.nn.functional as F

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def dpo(lp: SequenceLogps, *, beta: float = 0.1) -> LossOutput:
    """DPO, Eq. 7 (Rafailov et al. 2023, arXiv:2305.18290):

        loss = −log σ(β·h),  h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

    beta: strength of the pull towards the reference; larger stays closer, smaller lets the policy drift.
    Rewards: β·(log π(y) − log π_ref(y)) per completion. With policy == reference the loss is log 2.
    """
    check_positive("dpo", "beta", beta)
    ratios = log_ratios(lp, loss="dpo")
    losses = -F.logsigmoid(beta * ratios.margin)  # (B,)
    return reference_output(losses, ratios, beta=beta)
