"""The counterfactual-consistency term: partner awareness by consistency under a nullified intervention.

The seed finding (interventional counterfactual regularization, ICR): agents trained with RLHF or DPO weigh a
partner's suggestion by its surface plausibility, so they take up a misleading one as readily as a helpful one. The
remedy compares the agent's answer given the real exchange with its answer when the intervention's causal pathway
is cut, here the partner's message replaced by an uninformative one of the same form (`meta.nullified_prompt`,
written by the `agree-with-partner` context from `dpolab.partner`), and penalises the difference.

The answer distribution is the policy's, restricted to the pair's two replies: p = softmax(log π(y_w|x),
log π(y_l|x)) given the real prompt x and q the same given the nullified prompt x'. The term is KL(p ‖ q), per pair,
with gradients through both; the trainer adds λ·KL to the pair's preference loss (`consistency_weight`), so it
composes with any loss in LOSSES. It is 0 when x' = x and positive when the prompts move the answer.
"""
from __future__ import annotations

from torch import Tensor


def counterfactual_consistency(real: Tensor, nullified: Tensor) -> Tensor:
    """real, nullified: (b, 2) policy log-probs [chosen, rejected] given the real and the nullified prompt.
    Returns (b,) KL(p_real ‖ p_nullified) over the two replies, in nats."""
    p = real.log_softmax(-1)  # (b, 2)
    q = nullified.log_softmax(-1)  # (b, 2)
    return (p.exp() * (p - q)).sum(-1)  # (b,)
