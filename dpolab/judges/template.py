"""What a model judge is shown: the conversation and the reply in one user message (a template with slots), and
how its verdict is read from token log-probs. Shared by the local model judge and the endpoint judge."""
from __future__ import annotations

import math
import string
from collections.abc import Sequence

from dpolab.errors import ConfigError
from dpolab.judges import Conversation

SLOTS = ("conversation", "prompt", "reply")  # conversation: the whole transcript; prompt: the last user message

DEFAULT_TEMPLATE = (
    "Here is a conversation between a user and an assistant, and the assistant's next reply.\n\n"
    "[Conversation]\n{conversation}\n\n[Reply]\n{reply}\n\n"
    "Is this reply good: helpful, correct, clear and kind? Answer Yes or No."
)
RATING_TEMPLATE = (
    "Here is a conversation between a user and an assistant, and the assistant's next reply.\n\n"
    "[Conversation]\n{conversation}\n\n[Reply]\n{reply}\n\n"
    "Rate the reply from 1 (bad) to 10 (excellent): helpful, correct, clear and kind. Answer with the number only."
)
_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}


def check_template(template: str, *, judge: str) -> None:
    """Refuse a template with a slot other than SLOTS, or without {reply}."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"judge {judge!r}: template is not a format string ({exc}); write literal braces as {{{{ }}}}") from None
    unknown = sorted(n for n in names if n not in SLOTS)
    if unknown:
        raise ConfigError(f"judge {judge!r}: template slot(s) {', '.join(unknown)} unknown; choose from "
                          f"{', '.join('{' + s + '}' for s in SLOTS)}")
    if "reply" not in names:
        raise ConfigError(f"judge {judge!r}: the template must show the reply: add {{reply}}")


def transcript(conversation: Conversation) -> str:
    """The messages before the reply as "User: ..." / "Assistant: ..." paragraphs."""
    return "\n\n".join(f"{_ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in conversation)


def judge_messages(template: str, conversation: Conversation, reply: str, *, system: str | None = None) -> list[dict[str, str]]:
    """The judge's conversation: an optional system message and the filled template as the user's message."""
    last_user = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
    text = template.format(conversation=transcript(conversation), prompt=last_user, reply=reply)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def logsumexp(values: Sequence[float]) -> float:
    """log Σ exp(v): the log-prob of any of several spellings of one verdict ("Yes", " Yes", "yes")."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def verdict_score(logp_positive: float, logp_negative: float) -> float:
    """The judge's score: log p(positive) − log p(negative), the log-odds of the positive verdict between the two
    tokens. It ignores the mass on other tokens, so a judge that would rather say something else still ranks."""
    return logp_positive - logp_negative
