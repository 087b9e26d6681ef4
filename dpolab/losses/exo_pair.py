"""EXO (pairwise): fit the policy's choice between the two completions to the smoothed label by reverse KL."""
from __future__ import annotations

import math

import torch.nn.functional as F

from dpolab.errors import ConfigError
from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def exo_pair(lp: SequenceLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO-pref for K = 2 completions, Eq. 16 (Ji et al. 2024, "Towards Efficient Exact Optimization of Language
    Model Alignment", arXiv:2402.00856). The policy's distribution over {y_w, y_l} is q = softmax(β·log-ratios) =
    (σ(β·h), σ(−β·h)); the label, smoothed, is p = (1 − ε, ε); the loss is the reverse KL

        loss = KL(q ‖ p) = σ(β·h)·(log σ(β·h) − log(1 − ε)) + σ(−β·h)·(log σ(−β·h) − log ε)
        h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

    Zero when σ(β·h) = 1 − ε: like cdpo it stops pulling once the margin matches the label's confidence, but
    it is mode-seeking (reverse KL) where cdpo is mass-covering (forward KL).

    As TRL 1.16 (`loss_type="exo_pair"`): one β for the paper's β_π and β_r, and hard labels smoothed by ε; the
    paper's full EXO uses K > 2 sampled completions with reward-model scores. TRL's default ε is 0.0, which its
    trainer refuses for exo_pair (log ε); the default here is 1e-3, the value EXO recommends and TRL's error names.

    beta: strength of the pull towards the reference.
    label_smoothing: ε, the target probability that the rejected is better, in (0, 0.5); must be > 0.
    Rewards: β·(log π(y) − log π_ref(y)).
    """
    check_positive("exo_pair", "beta", beta)
    if not 0.0 < label_smoothing < 0.5:
        raise ConfigError(f"loss 'exo_pair': option label_smoothing must be in (0, 0.5) (log ε needs ε > 0; "
                          f"EXO recommends 1e-3), got {label_smoothing!r}")
    ratios = log_ratios(lp, loss="exo_pair")
    z = beta * ratios.margin  # (B,)
    log_q_chosen, log_q_rejected = F.logsigmoid(z), F.logsigmoid(-z)  # (B,) each
    kl_chosen = log_q_chosen.exp() * (log_q_chosen - math.log1p(-label_smoothing))  # (B,)
    kl_rejected = log_q_rejected.exp() * (log_q_rejected - math.log(label_smoothing))  # (B,)
    return reference_output(kl_chosen + kl_rejected, ratios, beta=beta)
