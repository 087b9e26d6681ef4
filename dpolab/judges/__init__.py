"""Judges: a score for each (conversation, reply), higher is better, behind one interface, so a curriculum, an
iterative loop or an RL reward can use any of them: programmatic (a probe's scorer, reply length), a local model
as judge, or an OpenAI-compatible endpoint."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dpolab.registry import Registry

Conversation = Sequence[dict[str, str]]

JUDGES = Registry("judge", {
    "toxicity": "dpolab.judges.programmatic:ToxicityJudge",  # 1 - toxicity of the reply (the detox probe's scorer)
    "length": "dpolab.judges.programmatic:LengthJudge",  # the reply's length in tokens: a length-biased judge
    "correctness": "dpolab.judges.programmatic:CorrectnessJudge",  # the reply keeps the MCQ item's right answer
    "model": "dpolab.judges.model:ModelJudge",  # a local model asked yes/no: log p(yes) - log p(no)
    "endpoint": "dpolab.judges.endpoint:EndpointJudge",  # an OpenAI-compatible server: verdict log-probs or a rating
})

# The judge a context's own pairs are ranked by, used by a method kind that names none.
CONTEXT_JUDGES = {"detox": "toxicity", "length-biased-judge": "length", "resist-only": "correctness",
                  "holistic": "correctness"}


class Judge(Protocol):
    """What a judge offers. `name` says what it measures in logs and cell.json."""

    name: str

    def score(self, conversations: Sequence[Conversation], replies: Sequence[str]) -> list[float]:
        """One score per reply, higher is better; conversations are the messages before each reply."""
        ...


def judge_options(name: str) -> list[str]:
    """The options a judge takes from a spec (its dataclass fields, less `name` and fields marked option=False,
    such as a callable or a model object that only code can pass)."""
    return [f.name for f in dataclasses.fields(JUDGES.get(name))
            if f.name != "name" and f.metadata.get("option", True)]


def check_judge_args(name: str, args: dict[str, Any]) -> None:
    """Refuse option keys the judge does not take, listing those it does."""
    from dpolab.errors import ConfigError

    valid = judge_options(name)
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for judge {name!r}; choose from {', '.join(valid) or 'none'}")


def make_judge(name: str, args: dict[str, Any] | None = None, *, token_count: Callable[[str], int] | None = None) -> Judge:
    """The judge `name` with its options `args` (checked and typed as a probe's options are).

    token_count: a tokenizer's counter, given to a judge that counts (`length`) unless its options set one.
    """
    from dpolab.options import make_options

    args = dict(args or {})
    check_judge_args(name, args)
    judge = make_options(JUDGES.get(name), args, kind="judge", name=name)
    if token_count is not None and getattr(judge, "count", False) is None:
        judge.count = token_count
    return judge


def context_judge(name: str | None, context: str, *, kind: str) -> str:
    """The judge a method kind uses on a context: `name` when given, else the context's own (CONTEXT_JUDGES)."""
    from dpolab.errors import ConfigError

    if name is not None:
        return name
    if context in CONTEXT_JUDGES:
        return CONTEXT_JUDGES[context]
    raise ConfigError(f"method kind {kind!r} on context {context!r} needs a judge: set options.judge to one of "
                      f"{', '.join(JUDGES.names())} (a default exists only for {', '.join(CONTEXT_JUDGES)})")
