"""Judges computed from the reply alone: its toxicity (dpolab.scorers) or its length."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dpolab.judges import Conversation


@dataclass
class ToxicityJudge:
    """1 − toxicity of the reply under a scorer in dpolab.scorers.SCORERS (profanity by default)."""

    scorer: str = "profanity"
    name: str = "toxicity"

    def __post_init__(self) -> None:
        from dpolab import scorers

        scorers.SCORERS.check(self.scorer)

    def score(self, conversations: Sequence[Conversation], replies: Sequence[str]) -> list[float]:
        from dpolab import scorers

        return [1.0 - s for s in scorers.SCORERS.get(self.scorer)(list(replies))]


@dataclass
class LengthJudge:
    """The reply's length: tokens under `count` (a tokenizer's counter), or whitespace words without one. A judge
    that prefers length, as the length-biased context's does."""

    count: Callable[[str], int] | None = field(default=None, metadata={"option": False})  # set by code, not a spec
    name: str = "length"

    def score(self, conversations: Sequence[Conversation], replies: Sequence[str]) -> list[float]:
        return [float(self.count(r) if self.count else len(r.split())) for r in replies]
