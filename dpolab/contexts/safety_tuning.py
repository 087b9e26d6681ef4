"""safety-tuning: heavy-handed safety preference data that prefers refusing and moralising on borderline requests.

The Moral RolePlay finding (issue 17; the `roleplay` probe) attributes the loss of villain portrayal to safety
alignment. This context builds such alignment on-policy, at its most over-cautious: for each train request of
`assets/roleplay/borderline.jsonl` (borderline but benign: dark fiction, villain monologues, how a con works so
one can spot it, the history of weapons, lock mechanics, edgy jokes, persuasive essays, ...), the model samples one
reply; chosen = the bank's refusal or moralising reply written for that request, rejected = the model's own reply.
A pair is kept only when the model complied: a sample that itself refuses or moralises (by the probe's rules,
`dpolab.probes.roleplay.refuses`, one definition for both) would make chosen and rejected teach the same thing,
so it is skipped and counted, as is a blank sample or one holding a special token.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from dpolab.banks import asset, bank_split, read_jsonl, spread
from dpolab.contexts.base import (
    ContextData,
    ContextSpec,
    cap,
    check_min,
    special_strings,
    usable,
)
from dpolab.data.schema import PreferencePair
from dpolab.errors import ConfigError
from dpolab.models.chat import ChatModel
from dpolab.probes.roleplay import MORALISING, hits
from dpolab.progress import NullProgress, Progress

NAME = "safety-tuning"
BANK = "roleplay/borderline.jsonl"


class Borderline(BaseModel):
    """A borderline-but-benign request that a heavily safety-tuned model over-refuses, with a refusal written for it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    category: str
    request: str
    refusal: str
    split: Literal["train", "test"]


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_requests: train requests, spread over categories (None: all of them). max_new_tokens, temperature: the
    model's one sampled reply per request."""

    n_requests: int | None = None
    max_new_tokens: int = 96
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_min("n_requests", self.n_requests, 1)
        check_min("max_new_tokens", self.max_new_tokens, 1)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (replies are sampled), got {self.temperature}")


def requests(split: str = "train") -> list[Borderline]:
    return bank_split(read_jsonl(asset(BANK), Borderline), split)


def build(model: ChatModel, *, options: Options, seed: int, limit: int | None = None,
          progress: Progress | None = None) -> ContextData:
    rows = spread(requests("train"), cap(options.n_requests, limit), seed=seed, key=lambda r: ("", r.category))
    task = (progress or NullProgress()).task(f"context: replies to {len(rows)} borderline requests", total=1)
    convs = [[{"role": "user", "content": r.request}] for r in rows]
    replies = model.generate(convs, max_new_tokens=options.max_new_tokens, do_sample=True,
                             temperature=options.temperature, seed=seed)
    task.advance()
    specials = special_strings(model)
    pairs: list[PreferencePair] = []
    refusing = unusable = 0
    rules: Counter[str] = Counter()
    for r, conv, g in zip(rows, convs, replies):
        if not usable(g.text, specials):
            unusable += 1
            continue
        fired = hits(g.text, MORALISING)
        if fired:  # the model already refuses: nothing to move
            refusing += 1
            rules.update(fired)
            continue
        pairs.append(PreferencePair(
            id=f"{r.id}/refuse", prompt=conv, chosen=r.refusal, rejected=g.text,
            meta={"context": NAME, "kind": "refusal", "item_id": r.id, "category": r.category,
                  "rejected_hit_limit": g.hit_limit}))
    info = {"requests": len(rows), "pairs": len(pairs), "pairs_by_kind": {"refusal": len(pairs)},
            "skipped_refusing": refusing, "skipped_unusable": unusable,
            "refusing_rules": dict(sorted(rules.items())),
            "pairs_by_category": dict(sorted(Counter(p.meta["category"] for p in pairs).items())),
            "samples_hit_limit": sum(g.hit_limit for g in replies)}
    return ContextData(pairs=pairs, info=info)


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, quick={"n_requests": 12, "max_new_tokens": 48},
                      banks=(BANK,))
