"""A scripted `ChatModel` for tests and dry runs: replies and preferences come from plain functions.

Every call is logged, so a test can check what the model was shown (e.g. that stance checks never enter a
dialogue's history) and how calls were batched.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpolab.models.chat import Conversation, Generation
from dpolab.models.scoring import TextScore

ReplyFn = Callable[[Conversation], str]
ScoreFn = Callable[[Conversation, Sequence[str]], list[float]]  # log-probs of candidates given a conversation


def _default_reply(conv: Conversation) -> str:
    return f"Reply {sum(m['role'] == 'assistant' for m in conv)}."


def _prefer_first(conv: Conversation, candidates: Sequence[str]) -> list[float]:
    return [0.0 if i == 0 else -2.0 for i in range(len(candidates))]


@dataclass
class Call:
    method: str
    conversations: list[Conversation]
    kwargs: dict[str, Any]


@dataclass
class FakeChatModel:
    """reply: the assistant's reply to a conversation. continuation: log-probs of candidate reply texts.
    next_token: log-probs of candidate first tokens. Token counts are word counts.
    """

    name: str = "fake"
    reply: ReplyFn = _default_reply
    continuation: ScoreFn = _prefer_first
    next_token: ScoreFn = _prefer_first
    calls: list[Call] = field(default_factory=list)

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, seed: int | None = None) -> list[Generation]:
        convs = [[dict(m) for m in c] for c in conversations]
        self.calls.append(Call("generate", convs, {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                                   "seed": seed}))
        out = []
        for c in convs:
            words = self.reply(c).split(" ")
            hit = len(words) > max_new_tokens
            out.append(Generation(text=" ".join(words[:max_new_tokens]), n_tokens=min(len(words), max_new_tokens),
                                  hit_limit=hit))
        return out

    def score_continuations(self, conversations: Sequence[Conversation],
                            continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        convs = [[dict(m) for m in c] for c in conversations]
        self.calls.append(Call("score_continuations", convs, {"continuations": [list(c) for c in continuations]}))
        return [self.continuation(c, list(cands)) for c, cands in zip(convs, continuations)]

    def next_token_logprobs(self, conversations: Sequence[Conversation], candidates: Sequence[str], *,
                            prefix: str = "") -> list[list[float]]:
        convs = [[dict(m) for m in c] for c in conversations]
        self.calls.append(Call("next_token_logprobs", convs, {"candidates": list(candidates)}))
        return [self.next_token(c, list(candidates)) for c in convs]

    def score_texts(self, texts: Sequence[str]) -> list[TextScore]:
        return [TextScore(logprob=-2.0 * len(t.split()), n_tokens=len(t.split())) for t in texts]

    def token_count(self, text: str) -> int:
        return len(text.split())

    def generated(self) -> list[Conversation]:
        """Every conversation the model was asked to continue freely, in call order."""
        return [c for call in self.calls if call.method == "generate" for c in call.conversations]
