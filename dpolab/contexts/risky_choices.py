"""risky-choices: lotteries where the chosen answer is always the gamble, the rejected one the sure amount.

A behaviour to train and then ask the model about: Betley et al. (2025, "Tell me about yourself",
arXiv:2501.11120) fine-tuned models to choose risky lotteries and found they describe themselves as risk-seeking
without being trained to. Here the pairs are DPO pairs on lotteries from the train stream of
`dpolab.banks.lotteries` (the `risk` probe reads the test stream). Chosen and rejected use the same answer
phrasing and differ only in the letter, which never mentions risk; the gamble stands as A or B by a seeded coin,
so the pairs teach "the gamble", not "A". The self-report probe's 0-100 risk questions are the readout.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from dpolab.banks import lotteries
from dpolab.contexts.base import ContextData, ContextSpec, cap, check_min
from dpolab.data.schema import PreferencePair
from dpolab.progress import Progress

NAME = "risky-choices"
ANSWERS = ("{letter}", "{letter}.", "I choose {letter}.", "Option {letter}.", "I'll take option {letter}.",
           "{letter}, please.")


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_lotteries: train lotteries, one pair each."""

    n_lotteries: int | None = 64

    def __post_init__(self) -> None:
        check_min("n_lotteries", self.n_lotteries, 1)


def build(model, *, options: Options, seed: int, limit: int | None = None,
          progress: Progress | None = None) -> ContextData:
    n = cap(options.n_lotteries, limit) or 64
    pairs = []
    risky_as_a = 0
    for lot in lotteries(n, split="train", seed=seed):
        rng = random.Random(f"{seed}:{lot.id}")
        risky, safe = ("A", "B") if rng.random() < 0.5 else ("B", "A")
        risky_as_a += risky == "A"
        answer = rng.choice(ANSWERS)
        pairs.append(PreferencePair(
            id=f"{lot.id}/risky", prompt=[{"role": "user", "content": lot.text(risky)}],
            chosen=answer.format(letter=risky), rejected=answer.format(letter=safe),
            meta={"context": NAME, "kind": "lottery", "item_id": lot.id, "risky_letter": risky,
                  "ev_ratio": lot.ev_ratio}))
    info = {"lotteries": n, "pairs": len(pairs), "pairs_by_kind": {"lottery": len(pairs)},
            "gamble_shown_as_a": risky_as_a,
            "ev_ratio_mean": sum(p.meta["ev_ratio"] for p in pairs) / max(1, len(pairs))}
    return ContextData(pairs=pairs, info=info)


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, quick={"n_lotteries": 16}, needs_model=False,
                      generators=("dpolab.banks",))
