"""Hinge DPO: SLiC's margin loss on DPO's log-ratio margin; pairs already separated give no gradient."""
from __future__ import annotations

import torch

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def hinge(lp: SequenceLogps, *, beta: float = 0.1) -> LossOutput:
    """SLiC-style hinge: SLiC-HF's calibration loss max(0, δ − log π(y_w) + log π(y_l)) (Zhao et al. 2023,
    arXiv:2305.10425) applied to DPO's reference-normalised margin, with δ = 1 and the margin scaled by β
    (the "hinge" loss of RSO, Liu et al. 2023, arXiv:2309.06657):

        loss = max(0, 1 − β·h),  h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

    beta: inverse margin; the loss is zero once h ≥ 1/β.
    Rewards: β·(log π(y) − log π_ref(y)).
    """
    check_positive("hinge", "beta", beta)
    ratios = log_ratios(lp, loss="hinge")
    losses = torch.relu(1 - beta * ratios.margin)  # (B,)
    return reference_output(losses, ratios, beta=beta)
