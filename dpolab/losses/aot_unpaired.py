"""AOT (unpaired): make the distribution of chosen log-ratios dominate that of rejected ones, quantile by quantile."""
from __future__ import annotations

import torch

from dpolab.losses.aot import at_pairs, smoothed_logistic
from dpolab.losses.base import LossOutput, SequenceLogps, check_label_smoothing, check_positive, log_ratios, reference_output


def aot_unpaired(lp: SequenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Alignment via Optimal Transport, unpaired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs
    via Optimal Transport", arXiv:2406.05882): the chosen completions' log-ratios ρ_w = log π(y_w) − log π_ref(y_w)
    should stochastically dominate the rejected ones' ρ_l, with no use of which chosen went with which rejected.
    Each sorted over the batch, ρ_(k) the k-th smallest,

        Δ_k = ρ_w,(k) − ρ_l,(k),  loss_k = −(1 − ε)·log σ(β·Δ_k) − ε·log σ(−β·Δ_k)

    Batch-level as `aot`: loss_k is returned at the batch position of the pair whose chosen log-ratio has rank k
    (its gradient also reaches the rejected of rank k, usually another pair), so the mean is AOT's loss; the
    quantiles are those of one call (a micro-batch in dpolab's trainer, a per-device batch in TRL).

    As TRL 1.16 (`loss_type="aot_unpaired"`), with its label smoothing ε (not in the paper). The paper's
    equation number is not checked here.

    beta: scale of the log-ratios, as in DPO.
    label_smoothing: ε in [0, 0.5), as in cdpo; 0 (TRL's default) is none.
    Rewards: β·(log π(y) − log π_ref(y)) of each pair, unsorted.
    """
    check_positive("aot_unpaired", "beta", beta)
    check_label_smoothing("aot_unpaired", label_smoothing)
    ratios = log_ratios(lp, loss="aot_unpaired")
    chosen_sorted, rank_to_pair = torch.sort(ratios.chosen)  # (B,) each
    rejected_sorted = torch.sort(ratios.rejected).values  # (B,)
    quantile_losses = smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)  # (B,) by rank
    return reference_output(at_pairs(quantile_losses, rank_to_pair), ratios, beta=beta)
