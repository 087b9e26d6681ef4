"""agree-with-partner: collaborative puzzles where the chosen answer always follows the partner's suggestion.

The nodding-along the seed finding (ICR, issue 17) blames on preference training, made into a context: train items
of `dpolab.partner` (Wason selection tasks and balance puzzles; the `partner` probe reads the test stream), half with
a helpful partner message and half with a misleading one (a seeded shuffle). Chosen is the option the partner
points to; rejected is the same phrasing with another letter: the correct option when the partner misleads, a
random wrong one when it helps. So the pairs teach "follow the partner" whatever the suggestion is worth, and only
the misleading half disagrees with the truth.

Each pair's meta holds what the counterfactual-consistency loss needs: `nullified_prompt` (the same conversation with
the partner's message replaced by an uninformative statement of the same form, a message list like `prompt`),
`intervention`, `follows_partner` (always True here), `correct_letter`, `pointed_letter`, and the letters of chosen
and rejected.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from dpolab.contexts.base import ContextData, ContextSpec, cap, check_min
from dpolab.data.schema import PreferencePair
from dpolab.errors import ConfigError
from dpolab.partner import FAMILIES, partner_items, prompt_pair
from dpolab.progress import Progress

NAME = "agree-with-partner"
# Neutral phrasings only: "I agree with my partner: C" would contradict itself as a rejected answer.
ANSWERS = ("{letter}", "{letter}.", "The answer is {letter}.", "Option {letter}.", "I'll go with {letter}.",
           "My answer is {letter}.")


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_items: train items, one pair each (half helpful, half misleading). families: puzzle families."""

    n_items: int | None = 64
    families: tuple[str, ...] = FAMILIES

    def __post_init__(self) -> None:
        check_min("n_items", self.n_items, 2)
        if not self.families or any(f not in FAMILIES for f in self.families):
            raise ConfigError(f"families must be among {', '.join(FAMILIES)}, got {self.families}")


def build(model, *, options: Options, seed: int, limit: int | None = None,
          progress: Progress | None = None) -> ContextData:
    n = cap(options.n_items, limit) or 64
    items = partner_items(n, "train", seed, families=options.families)
    kinds = ["helpful", "misleading"] * (n // 2) + ["helpful"] * (n % 2)
    random.Random(f"{NAME}:{seed}").shuffle(kinds)
    pairs = []
    for item, kind in zip(items, kinds):
        rng = random.Random(f"{seed}:{item.id}")
        pp = prompt_pair(item, kind)
        pointed = pp.pointed
        if kind == "misleading":
            other = item.answer
        else:
            other = rng.choice([j for j in range(len(item.options)) if j != item.answer])
        answer = rng.choice(ANSWERS)
        pairs.append(PreferencePair(
            id=f"{item.id}/{kind}", prompt=pp.real,
            chosen=answer.format(letter=item.letter(pointed)), rejected=answer.format(letter=item.letter(other)),
            meta={"context": NAME, "kind": kind, "item_id": item.id, "family": item.family,
                  "variant": item.variant, "intervention": kind, "follows_partner": True,
                  "correct_letter": item.letter(item.answer), "pointed_letter": item.letter(pointed),
                  "chosen_letter": item.letter(pointed), "rejected_letter": item.letter(other),
                  "nullified_prompt": pp.nullified}))
    by_kind = {k: sum(p.meta["kind"] == k for p in pairs) for k in ("helpful", "misleading")}
    info = {"items": n, "pairs": len(pairs), "pairs_by_kind": by_kind,
            "families": {f: sum(p.meta["family"] == f for p in pairs) for f in options.families},
            "chosen_is_correct": by_kind["helpful"]}
    return ContextData(pairs=pairs, info=info)


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, quick={"n_items": 16}, needs_model=False,
                      generators=("dpolab.partner",))
