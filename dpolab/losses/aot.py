"""AOT (paired): make the policy's distribution of margins dominate the reference's, quantile by quantile."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpolab.losses.base import LossOutput, SequenceLogps, check_label_smoothing, check_positive, log_ratios, reference_output


def aot(lp: SequenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Alignment via Optimal Transport, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs
    via Optimal Transport", arXiv:2406.05882): first-order stochastic dominance of the policy's margins over the
    reference's, made a loss through the 1-D optimal transport between the two empirical distributions, which
    matches them by rank. With m = log π(y_w) − log π(y_l) (policy) and m_ref the same under the reference,
    sorted over the batch, m_(k) the k-th smallest,

        Δ_k = m_(k) − m_ref,(k),  loss_k = −(1 − ε)·log σ(β·Δ_k) − ε·log σ(−β·Δ_k)

    With one pair (or policy and reference margins ranked alike) this is cdpo's loss, so DPO at ε = 0.

    Batch-level, honestly: loss_k is not a function of pair k. It is the loss of the k-th quantile, and this
    function returns it at the batch position of the pair whose policy margin has rank k (the pair its gradient
    flows into), so the mean over the batch is AOT's loss and a per-pair weight weighs that pair's quantile. The
    quantiles are those of the pairs in one call: in dpolab's trainer a micro-batch (batch_size / (processes ×
    grad_accum), split further under forward_tokens), as in TRL a per-device batch; larger batches give finer
    quantiles, and gradient accumulation does not give the gradient of one big batch. Ties sort in any order
    and give the same loss.

    As TRL 1.16 (`loss_type="aot"`), whose label smoothing ε is not in the paper (ε = 0 is the paper's logistic
    relaxation of the dominance constraint). The paper's equation number is not checked here.

    beta: scale of the margins, as in DPO.
    label_smoothing: ε in [0, 0.5), as in cdpo; 0 (TRL's default) is none.
    Rewards: β·(log π(y) − log π_ref(y)) of each pair, unsorted.
    """
    check_positive("aot", "beta", beta)
    check_label_smoothing("aot", label_smoothing)
    ratios = log_ratios(lp, loss="aot")
    policy_sorted, rank_to_pair = torch.sort(lp.chosen - lp.rejected)  # (B,) each
    reference_sorted = torch.sort(lp.ref_chosen - lp.ref_rejected).values  # (B,)
    quantile_losses = smoothed_logistic(beta * (policy_sorted - reference_sorted), label_smoothing)  # (B,) by rank
    return reference_output(at_pairs(quantile_losses, rank_to_pair), ratios, beta=beta)


def smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """−(1 − ε)·log σ(z) − ε·log σ(−z), elementwise; cdpo's loss of a logit z."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def at_pairs(by_rank: Tensor, rank_to_pair: Tensor) -> Tensor:
    """Put the value of rank k at batch position rank_to_pair[k] (the inverse of sorting), keeping gradients."""
    return by_rank[torch.argsort(rank_to_pair)]  # (B,)
