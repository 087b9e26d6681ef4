"""DiscoPOP: a blend of DPO's logistic loss and an exponential loss, the mix set by the margin itself."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def discopop(lp: SequenceLogps, *, beta: float = 0.1, tau: float = 0.05) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (LRML), Eq. 5 (Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", arXiv:2406.08414). With ρ = β·h,

        m = σ(ρ/τ),  loss = (1 − m)·(−log σ(ρ)) + m·exp(−ρ)
        h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

    Logistic (DPO) for negative margins, exponential for positive ones; τ sets how sharp the switch is. The
    exponential term is computed as exp(log σ(ρ/τ) − ρ), so a very negative ρ gives 0·∞ nowhere.

    Not monotone: across ρ = 0 the mix moves from log 2 (logistic) to 1 (exponential) over a width of about τ, so
    the slope at ρ = 0 is (1 − log 2)/(4τ) − 3/4, positive for τ < 0.10 (tested). At the default τ = 0.05 a pair
    at the reference (h = 0) is pushed towards a local minimum at ρ ≈ −0.12 (loss 0.786), behind a local maximum
    at ρ ≈ +0.07 (0.878); past it the loss falls to 0 as e^(−ρ).

    As TRL 1.16 (`loss_type="discopop"`, τ = `discopop_tau`).

    beta: strength of the pull towards the reference.
    tau: temperature of the mixing σ(ρ/τ), > 0; 0.05 is the paper's (and TRL's) default.
    Rewards: β·(log π(y) − log π_ref(y)).
    """
    check_positive("discopop", "beta", beta)
    check_positive("discopop", "tau", tau)
    ratios = log_ratios(lp, loss="discopop")
    rho = beta * ratios.margin  # (B,)
    logistic = torch.sigmoid(-rho / tau) * F.softplus(-rho)  # (B,) (1 − m)·(−log σ(ρ))
    exponential = torch.exp(F.logsigmoid(rho / tau) - rho)  # (B,) m·exp(−ρ)
    return reference_output(logistic + exponential, ratios, beta=beta)
