"""A local model as judge: it is asked whether a reply is good, and the score is the log-odds of its verdict
tokens (log p(" Yes") − log p(" No") as the first token of its answer, by default "Yes" and "No")."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dpolab import DEFAULT_MODEL
from dpolab.errors import ConfigError
from dpolab.judges import Conversation
from dpolab.judges.template import DEFAULT_TEMPLATE, check_template, judge_messages, verdict_score


@dataclass
class ModelJudge:
    """model: a built-in name or Hugging Face folder (default: the embedded model), loaded on first use.
    template: the judge's user message, with {reply} and optionally {conversation} (the transcript before the
        reply) and {prompt} (the last user message); see dpolab.judges.template.
    positive, negative: the verdict tokens; each must be one token under the judge's tokenizer.
    prefix: text the judge's answer starts with before the verdict token (e.g. "Answer:" with " Yes"/" No").
    system: an optional system message for the judge.
    dtype, batch_size: how the judge model runs.
    chat: a ChatModel to judge with instead of loading `model` (not a spec option: for code and tests).
    """

    model: str = DEFAULT_MODEL
    template: str = DEFAULT_TEMPLATE
    positive: str = "Yes"
    negative: str = "No"
    prefix: str = ""
    system: str | None = None
    dtype: str = "float32"
    batch_size: int = 16
    chat: Any = field(default=None, repr=False, metadata={"option": False})
    name: str = "model"

    def __post_init__(self) -> None:
        check_template(self.template, judge="model")
        if not self.positive or not self.negative or self.positive == self.negative:
            raise ConfigError(f"judge 'model': positive and negative must be two different tokens, got "
                              f"{self.positive!r} and {self.negative!r}")

    def _judge(self):
        if self.chat is None:
            from dpolab.models.backends import chat_model
            from dpolab.models.load import load_model

            self.chat = chat_model(load_model(self.model, dtype=self.dtype), backend="hf", batch_size=self.batch_size)
        return self.chat

    def score(self, conversations: Sequence[Conversation], replies: Sequence[str]) -> list[float]:
        convs = [judge_messages(self.template, c, r, system=self.system) for c, r in zip(conversations, replies, strict=True)]
        if not convs:
            return []
        try:
            logps = self._judge().next_token_logprobs(convs, [self.positive, self.negative], prefix=self.prefix)
        except ValueError as exc:  # a verdict that is not one token under the judge's tokenizer
            raise ConfigError(f"judge 'model' ({self.model}): {exc}; choose verdict tokens that are one token each "
                              "(e.g. positive: ' Yes', negative: ' No' with prefix: 'Answer:')") from None
        return [verdict_score(pos, neg) for pos, neg in logps]  # (N,)
