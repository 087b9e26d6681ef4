"""SPPO with hard labels: regress each log-ratio onto ±1/(2β), the winner up and the loser down."""
from __future__ import annotations

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_output


def sppo_hard(lp: SequenceLogps, *, beta: float = 0.1) -> LossOutput:
    """SPPO, Eq. 4.7 in Algorithm 1 (Wu et al. 2024, "Self-Play Preference Optimization for Language Model
    Alignment", arXiv:2405.00675), with the win probability P̂ set to 1 for the chosen and 0 for the rejected
    and the paper's η = 1/β:

        loss = (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²,  ρ = log π(y) − log π_ref(y)  (summed over tokens, not scaled by β)

    Differs from the paper, as TRL 1.16 (`loss_type="sppo_hard"`) does: the paper's P̂ is a soft probability
    estimated by a preference model (PairRM) against samples of the current policy, iterated in self-play
    rounds; here the pair's label is the probability, on offline pairs.

    beta: the targets are ±1/(2β); larger β keeps the log-ratios smaller.
    Rewards: β·(log π(y) − log π_ref(y)).
    """
    check_positive("sppo_hard", "beta", beta)
    ratios = log_ratios(lp, loss="sppo_hard")
    target = 1 / (2 * beta)
    losses = (ratios.chosen - target) ** 2 + (ratios.rejected + target) ** 2  # (B,)
    return reference_output(losses, ratios, beta=beta)
