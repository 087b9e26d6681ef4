"""Conservative DPO: DPO against labels smoothed towards "could be either way"."""
from __future__ import annotations

import torch.nn.functional as F

from dpolab.losses.base import LossOutput, SequenceLogps, check_label_smoothing, check_positive, log_ratios, reference_output


def cdpo(lp: SequenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """cDPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"): cross-entropy
    against a target that the chosen wins with probability 1 − ε,

        loss = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

    Bounded below (minimum at σ(β·h) = 1 − ε), so the margin stops growing: conservative. Compare
    `robust`, which keeps DPO's optimum and instead corrects the noise bias.

    beta: strength of the pull towards the reference.
    label_smoothing: ε, the assumed probability that a pair's label is flipped, in [0, 0.5); 0 is DPO.
    Rewards: β·(log π(y) − log π_ref(y)).
    """
    check_positive("cdpo", "beta", beta)
    check_label_smoothing("cdpo", label_smoothing)
    ratios = log_ratios(lp, loss="cdpo")
    logits = beta * ratios.margin  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)  # (B,)
    return reference_output(losses, ratios, beta=beta)
