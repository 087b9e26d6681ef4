"""The maths of critic-free RL, as pure functions of tensors: group advantages (GRPO, Lite PPO, RLOO), the PPO
clipped per-token loss, the k3 KL estimate to the reference, and token- or sequence-level aggregation.

Shapes: P prompts, G replies each (a group), N = P·G replies, T = the longest reply's tokens. Per-token tensors
are (N, T) with a 0/1 `mask` of the reply's real tokens; rewards and advantages are (P, G) before `.flatten()`.
The loop that samples, scores and steps is dpolab.methods.rl.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Baseline = Literal["group-mean", "leave-one-out"]
STD_SCALES = ("batch", "group", "none")  # what an advantage is divided by
AGGREGATIONS = ("token", "sequence")  # how per-token losses become one number
EPS = 1e-6  # added to a standard deviation: a group whose rewards all tie gets advantage 0, not 0/0


@dataclass(frozen=True)
class Algorithm:
    """A named critic-free method: its baseline, the scale its advantages are divided by, and its aggregation.
    The `rl` kind's options can override the scale and the aggregation (the ablations of arXiv:2508.08221)."""

    name: str
    baseline: Baseline
    std: str  # one of STD_SCALES
    aggregation: str  # one of AGGREGATIONS
    paper: str


ALGORITHMS = {a.name: a for a in (
    # Lite PPO: group-level mean, batch-level std, token-level aggregation, vanilla PPO clipped loss, no critic.
    Algorithm("lite-ppo", "group-mean", "batch", "token", "Liu et al. 2025, Tricks or Traps?, arXiv:2508.08221"),
    # GRPO, Eq. 3 and §4.1.2: Â = (r − mean(group)) / std(group); 1/|o_i| Σ_t per reply, then 1/G Σ_i.
    Algorithm("grpo", "group-mean", "group", "sequence", "Shao et al. 2024, DeepSeekMath, arXiv:2402.03300"),
    # RLOO: r_i − mean of the other G−1; the paper's REINFORCE on the whole reply (Σ_t log π) is token-level
    # aggregation up to the batch's constant 1/(total tokens).
    Algorithm("rloo", "leave-one-out", "none", "token", "Ahmadian et al. 2024, Back to Basics, arXiv:2402.14740"),
)}


def group_advantages(rewards: Tensor, *, baseline: Baseline, std: str, eps: float = EPS) -> Tensor:
    """Advantages of each reply against its own group.  rewards (P, G) -> (P, G)

    baseline "group-mean":     A_i = r_i − mean_j r_j                               (GRPO §4.1.2; Lite PPO)
    baseline "leave-one-out":  A_i = r_i − 1/(G−1) Σ_{j≠i} r_j = G/(G−1) (r_i − mean_j r_j)      (RLOO)
    then divided by std + eps, where std is
      "group": each group's standard deviation (GRPO),
      "batch": the standard deviation of all N rewards in the batch (Lite PPO: group mean, batch std),
      "none":  not divided (RLOO; Dr. GRPO).
    Standard deviations are the unbiased ones (Bessel's correction), as torch.std and TRL's GRPOTrainer compute.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, group) with a group of at least 2, got {tuple(rewards.shape)}")
    G = rewards.shape[1]
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if baseline == "leave-one-out":
        centred = centred * (G / (G - 1))
    elif baseline != "group-mean":
        raise ValueError(f"unknown baseline {baseline!r}; choose from group-mean, leave-one-out")
    if std == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if std == "batch":
        return centred / (rewards.std() + eps)
    if std == "none":
        return centred
    raise ValueError(f"unknown std scale {std!r}; choose from {', '.join(STD_SCALES)}")


@dataclass
class ClippedLoss:
    """Per-token PPO losses and which tokens the clip took the gradient from (both (N, T))."""

    losses: Tensor  # (N, T)
    clipped: Tensor  # (N, T) bool


def ppo_clip(logps: Tensor, old_logps: Tensor, advantages: Tensor, *, clip: float) -> ClippedLoss:
    """PPO's clipped surrogate per token, as a loss (Schulman et al. 2017, arXiv:1707.06347, Eq. 7):

        ρ_t = exp(log π(y_t) − log π_old(y_t)),   loss_t = −min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε) A)

    logps, old_logps: (N, T) token log-probs under the policy being trained and under the one that sampled.
    advantages: (N,) one per reply, shared by its tokens (outcome reward, no critic).
    clip: ε. `clipped` marks the tokens where the clipped term is the smaller one and moved away from 1 in the
    direction A favours: their gradient is zero (the clip fraction).
    """
    A = advantages[:, None]  # (N, 1)
    ratio = (logps - old_logps).exp()  # (N, T)
    unclipped = ratio * A
    clipped = ratio.clamp(1 - clip, 1 + clip) * A
    return ClippedLoss(losses=-torch.minimum(unclipped, clipped), clipped=clipped < unclipped)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """The per-token KL(π ‖ π_ref) estimate on tokens sampled from π, k3 of Schulman (2020, "Approximating KL
    divergence"), as GRPO uses it (arXiv:2402.03300, Eq. 4):

        KL_t = π_ref(y_t)/π(y_t) − log(π_ref(y_t)/π(y_t)) − 1   (unbiased, never negative)

    logps, ref_logps: (N, T) -> (N, T)
    """
    d = ref_logps - logps  # (N, T)
    return d.exp() - d - 1


def aggregate(token_losses: Tensor, mask: Tensor, how: str, *, n_tokens: float | None = None,
              n_sequences: float | None = None) -> Tensor:
    """One loss from per-token losses (N, T) and the reply mask (N, T):

        token:     Σ_{i,t} ℓ_it / Σ_{i,t} m_it          (every token weighs the same: Lite PPO, DAPO)
        sequence:  1/N Σ_i ( Σ_t ℓ_it / Σ_t m_it )      (every reply weighs the same: GRPO, Eq. 3)

    n_tokens, n_sequences: the denominators when these rows are one micro-batch of a larger batch (the batch's
    total tokens and replies), so that micro-batch losses add up to the batch's; default: these rows' own.
    """
    mask = mask.to(token_losses.dtype)
    summed = token_losses * mask  # (N, T)
    if how == "token":
        return summed.sum() / (mask.sum() if n_tokens is None else n_tokens)
    if how == "sequence":
        per_reply = summed.sum(-1) / mask.sum(-1).clamp(min=1)  # (N,)
        return per_reply.sum() / (per_reply.shape[0] if n_sequences is None else n_sequences)
    raise ValueError(f"unknown aggregation {how!r}; choose from {', '.join(AGGREGATIONS)}")


@dataclass
class RLLoss:
    """The loss to backpropagate and what the step log reports (detached sums over the rows' real tokens)."""

    loss: Tensor  # ()
    clipped_tokens: float
    kl_sum: float  # Σ KL_t over the rows' tokens (0 without a reference)
    tokens: float


def rl_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, clip: float, aggregation: str,
            ref_logps: Tensor | None = None, kl_coef: float = 0.0, n_tokens: float | None = None,
            n_sequences: float | None = None) -> RLLoss:
    """The clipped loss plus kl_coef · KL to the reference, per token, then aggregated (GRPO Eq. 3 with the
    aggregation and the advantages chosen by the algorithm).  logps, old_logps, mask, ref_logps (N, T); advantages (N,)
    """
    out = ppo_clip(logps, old_logps, advantages, clip=clip)
    per_token = out.losses  # (N, T)
    real = mask.bool()
    kl_sum = 0.0
    if ref_logps is not None and kl_coef > 0:
        kl = k3_kl(logps, ref_logps)  # (N, T)
        per_token = per_token + kl_coef * kl
        kl_sum = float(kl.detach()[real].sum())
    loss = aggregate(per_token, mask, aggregation, n_tokens=n_tokens, n_sequences=n_sequences)
    return RLLoss(loss=loss, clipped_tokens=float(out.clipped[real].sum()), kl_sum=kl_sum, tokens=float(real.sum()))
