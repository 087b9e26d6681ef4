"""NCA (pairwise): push the chosen's own reward up and both rewards' noise term down, absolute not relative."""
from __future__ import annotations

import torch.nn.functional as F

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def nca_pair(lp: SequenceLogps, *, beta: float = 0.1) -> LossOutput:
    """NCA for preference pairs (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", arXiv:2402.05369, the NCA loss with K = 2 responses and the winner as the one positive):

        loss = −log σ(r_w) − ½·log σ(−r_w) − ½·log σ(−r_l),  r = β·(log π(y) − log π_ref(y))

    Each reward is pushed on its own (NCE's data-versus-noise classification) rather than only their difference;
    the paper's point is that the chosen's likelihood then need not fall along with the rejected's, as it often
    does under DPO. Only the chosen's first term pulls a reward up.

    As TRL 1.16 (`loss_type="nca_pair"`), on the raw log-ratios. Equation number in the paper not checked here.

    beta: scale of the reward, as in DPO.
    Rewards: r = β·(log π(y) − log π_ref(y)).
    """
    check_positive("nca_pair", "beta", beta)
    ratios = log_ratios(lp, loss="nca_pair")
    r_w, r_l = beta * ratios.chosen, beta * ratios.rejected  # (B,) each
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)  # (B,)
    return reference_output(losses, ratios, beta=beta)
