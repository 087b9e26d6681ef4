"""What every loss takes and returns: per-pair sequence log-probs in, per-pair losses and implicit rewards out."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, TypeVar

from torch import Tensor

from dpolab.errors import ConfigError, TrainingError


@dataclass
class SequenceLogps:
    """One entry per preference pair; every tensor has shape (B,).

    chosen, rejected: policy log-prob of each completion, summed over its tokens.
    chosen_tokens, rejected_tokens: completion lengths in tokens (float, each >= 1), for the
        length-normalised losses (IPO, SimPO, SFT) and R-DPO.
    ref_chosen, ref_rejected: the reference model's summed log-probs; None for reference-free losses.
    score_chosen, score_rejected: optional quality scores of each completion (used by ODPO).
    """

    chosen: Tensor  # (B,)
    rejected: Tensor  # (B,)
    chosen_tokens: Tensor  # (B,)
    rejected_tokens: Tensor  # (B,)
    ref_chosen: Tensor | None = None  # (B,)
    ref_rejected: Tensor | None = None  # (B,)
    score_chosen: Tensor | None = None  # (B,)
    score_rejected: Tensor | None = None  # (B,)

    def __post_init__(self) -> None:
        # A (B, 1) against a (B,) would broadcast to (B, B) and give a plausible-looking wrong loss.
        shape = self.chosen.shape
        if len(shape) != 1:
            raise ValueError(f"SequenceLogps.chosen must have shape (B,), got {tuple(shape)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value.shape != shape:
                raise ValueError(f"SequenceLogps.{f.name} has shape {tuple(value.shape)}; expected {tuple(shape)} like chosen")

    def __len__(self) -> int:
        return self.chosen.shape[0]


@dataclass
class LossOutput:
    """losses: per-pair loss, not reduced (the trainer weights and averages it).
    chosen_rewards, rejected_rewards: each loss's implicit reward of the two completions, detached;
        their difference is the reward margin, and chosen > rejected is reward accuracy.
    """

    losses: Tensor  # (B,)
    chosen_rewards: Tensor  # (B,)
    rejected_rewards: Tensor  # (B,)


@dataclass
class LogRatios:
    """Policy-over-reference log-ratios of each completion, log π(y|x) − log π_ref(y|x), summed over tokens."""

    chosen: Tensor  # (B,)
    rejected: Tensor  # (B,)

    @property
    def margin(self) -> Tensor:
        """h = log-ratio of the chosen minus that of the rejected; DPO's logit before β."""
        return self.chosen - self.rejected  # (B,)


def log_ratios(lp: SequenceLogps, *, loss: str) -> LogRatios:
    """The two log-ratios; raises if the trainer passed no reference log-probs to a reference-based loss."""
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise TrainingError(
            f"loss {loss!r} needs reference log-probs (ref_chosen, ref_rejected) but got none; "
            "compute them whenever needs_reference(loss) is True, or choose a reference-free loss (simpo, sft)"
        )
    return LogRatios(chosen=lp.chosen - lp.ref_chosen, rejected=lp.rejected - lp.ref_rejected)


def reference_output(losses: Tensor, ratios: LogRatios, *, beta: float) -> LossOutput:
    """LossOutput with DPO's implicit rewards r = β·(log π(y|x) − log π_ref(y|x)) (DPO, Eq. 5 arXiv:2305.18290)."""
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * ratios.chosen).detach(),  # (B,)
        rejected_rewards=(beta * ratios.rejected).detach(),  # (B,)
    )


def check_positive(loss: str, option: str, value: float) -> None:
    """Options that divide or scale must be > 0; a zero would give inf or a silently dead loss."""
    if not value > 0:
        raise ConfigError(f"loss {loss!r}: option {option} must be > 0, got {value!r}")


def check_label_smoothing(loss: str, value: float) -> None:
    """ε is the assumed probability that a label is flipped; at 0.5 the labels carry no information."""
    if not 0.0 <= value < 0.5:
        raise ConfigError(f"loss {loss!r}: option label_smoothing must be in [0, 0.5), got {value!r}")


LossFn = TypeVar("LossFn", bound=Callable)


def reference_free(fn: LossFn) -> LossFn:
    """Mark a loss that never reads ref_chosen / ref_rejected, so the trainer can skip the reference forward."""
    fn.reference_free = True  # type: ignore[attr-defined]
    return fn
