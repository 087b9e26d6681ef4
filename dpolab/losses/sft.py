"""SFT baseline: the per-token negative log-likelihood of the chosen completion; the rejected is unused."""
from __future__ import annotations

from dpolab.losses.base import LossOutput, SequenceLogps, check_positive, log_ratios, reference_free, reference_output


@reference_free
def sft(lp: SequenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Supervised fine-tuning on the chosen completions:

        loss = −log π(y_w) / |y_w|

    beta: only scales the reported rewards (it is accepted so one beta can be set for every loss).
    Rewards: if reference log-probs are given, DPO's β·(log π(y) − log π_ref(y)), comparable with the
        preference losses; otherwise the per-token log-prob log π(y)/|y| of each completion (β unused).
    """
    check_positive("sft", "beta", beta)
    losses = -lp.chosen / lp.chosen_tokens  # (B,)
    if lp.ref_chosen is not None and lp.ref_rejected is not None:
        return reference_output(losses, log_ratios(lp, loss="sft"), beta=beta)
    return LossOutput(
        losses=losses,
        chosen_rewards=(lp.chosen / lp.chosen_tokens).detach(),  # (B,)
        rejected_rewards=(lp.rejected / lp.rejected_tokens).detach(),  # (B,)
    )
