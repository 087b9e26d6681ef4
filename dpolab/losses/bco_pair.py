"""BCO (pairwise): a binary classifier with the implicit reward as its logit, chosen -> 1 and rejected -> 0."""
from __future__ import annotations

import torch.nn.functional as F

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def bco_pair(lp: SequenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Binary Classifier Optimization on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large
    Language Model Alignment", arXiv:2404.04656): binary cross-entropy with logit r = β·log-ratio,

        loss = −log σ(r_w) − log σ(−r_l),  r = β·(log π(y) − log π_ref(y))

    The paper's BCE bound on the DPO loss (its Theorem 1) with each completion classified on its own.

    Differs from the paper, as TRL 1.16 (`loss_type="bco_pair"`) does: the paper shifts both logits by δ, a
    running mean of the rewards kept across steps (r − δ), which older TRL versions kept in the trainer. TRL
    1.16 has no shift, and neither has this loss, so it stays a pure function of the batch with no state: a
    shift would be a small object the trainer owns and passes in, not implemented here.

    beta: scale of the reward, as in DPO.
    Rewards: r = β·(log π(y) − log π_ref(y)), the classifier's logits.
    """
    check_positive("bco_pair", "beta", beta)
    ratios = log_ratios(lp, loss="bco_pair")
    losses = -F.logsigmoid(beta * ratios.chosen) - F.logsigmoid(-beta * ratios.rejected)  # (B,)
    return reference_output(losses, ratios, beta=beta)
