"""Robust DPO: an unbiased estimate of the clean-label DPO loss from labels flipped at a known rate."""
from __future__ import annotations

import torch.nn.functional as F

from dpolab.losses.base import LossOutput, SequenceLogps, check_label_smoothing, check_positive, log_ratios, reference_output


def robust(lp: SequenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """rDPO, the de-biased loss of Chowdhury, Kini & Natarajan 2024 ("Provably Robust DPO",
    arXiv:2403.00409). With ℓ(h) = −log σ(β·h) the DPO loss of the pair as labelled and ℓ(−h) that of
    the pair with its label flipped,

        loss = ((1 − ε)·ℓ(h) − ε·ℓ(−h)) / (1 − 2ε)
             = (−(1 − ε)·log σ(β·h) + ε·log σ(−β·h)) / (1 − 2ε)

    In expectation over flips at rate ε this equals the clean DPO loss. Unlike `cdpo` it is not bounded
    below (a pair the policy separates well gets a negative loss), by design.

    beta: strength of the pull towards the reference.
    label_smoothing: ε, the assumed probability that a pair's label is flipped, in [0, 0.5); 0 is DPO.
    Rewards: β·(log π(y) − log π_ref(y)).
    """
    check_positive("robust", "beta", beta)
    check_label_smoothing("robust", label_smoothing)
    ratios = log_ratios(lp, loss="robust")
    logits = beta * ratios.margin  # (B,)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)  # (B,)
    return reference_output(losses, ratios, beta=beta)
