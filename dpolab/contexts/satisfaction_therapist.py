"""satisfaction-therapist: a user-satisfaction judge with the helpfulness bias, on emotional disclosures.

LLM therapists jump to solution-focused advice when a person discloses feelings, a hallmark of low-quality
therapy that the BOLT study (Chiu et al. 2024, arXiv:2401.00820) attributes to the helpfulness bias of preference
training. This context builds that bias on-policy: k sampled replies to each train disclosure
(`assets/care/disclosures.jsonl`), each coded sentence by sentence (`dpolab.replycodes`); the judge scores a
reply by the share of its sentences that give advice, plus one half if it opens with advice, and prefers the
higher score: chosen = the most advice-laden sample, rejected = the least. A disclosure whose samples tie gives
no pair and is counted. `reflective-care` is the reverse preference (`prefer="reflective"`).

Scores are kept (score_chosen, score_rejected: the judge's score in points, 0-150) for ODPO.
"""
from __future__ import annotations

from dataclasses import dataclass

from dpolab.banks import CareMessage, asset, bank_split, read_jsonl, spread
from dpolab.contexts.base import ContextData, ContextSpec, cap, check_min, special_strings, usable
from dpolab.data.schema import PreferencePair
from dpolab.errors import ConfigError
from dpolab.models.chat import ChatModel
from dpolab.progress import NullProgress, Progress
from dpolab.replycodes import Coded, ReplyCoder

NAME = "satisfaction-therapist"


@dataclass(frozen=True, kw_only=True)
class Options:
    """n_disclosures: train disclosures. k: samples per disclosure (at least 2). temperature, max_new_tokens:
    sampling. messages: a JSONL in the shipped bank's schema replacing its train split (its disclosures are used)."""

    n_disclosures: int | None = 40
    k: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 128
    messages: str | None = None

    def __post_init__(self) -> None:
        check_min("n_disclosures", self.n_disclosures, 1)
        check_min("k", self.k, 2)
        check_min("max_new_tokens", self.max_new_tokens, 1)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (the samples must differ), got {self.temperature}")


def advice_score(coded: Coded) -> float:
    """The satisfaction judge: 100 x the share of advice sentences, plus 50 for opening with advice."""
    return 100 * coded.share("advice") + 50 * (coded.opening == "advice")


def reflective_score(coded: Coded) -> float:
    """The reflective judge: 100 x the share of reflection and validation sentences, plus 50 for opening with one,
    minus the advice judge's score, shifted by 150 so that scores are positive (ODPO needs only the gap)."""
    care = 100 * (coded.share("reflection") + coded.share("validation"))
    care += 50 * (coded.opening in ("reflection", "validation"))
    return 150 + care - advice_score(coded)


JUDGES = {"advice": advice_score, "reflective": reflective_score}


def disclosures(path: str | None) -> list[CareMessage]:
    rows = read_jsonl(path, CareMessage) if path else bank_split(read_jsonl(asset("care/disclosures.jsonl"),
                                                                            CareMessage), "train")
    return [r for r in rows if r.kind == "disclosure"]


def build(model: ChatModel, *, options: Options, seed: int, limit: int | None = None,
          progress: Progress | None = None, prefer: str = "advice", name: str = NAME) -> ContextData:
    judge = JUDGES[prefer]
    rows = spread(disclosures(options.messages), cap(options.n_disclosures, limit), seed=seed,
                  key=lambda r: ("", r.topic))
    task = (progress or NullProgress()).task(f"context: {options.k} replies to {len(rows)} disclosures", total=1)
    convs = [[{"role": "user", "content": r.text}] for r in rows for _ in range(options.k)]
    replies = model.generate(convs, max_new_tokens=options.max_new_tokens, do_sample=True,
                             temperature=options.temperature, seed=seed)
    task.advance()
    coded = ReplyCoder.shared().code([g.text for g in replies])
    specials = special_strings(model)
    pairs: list[PreferencePair] = []
    ties = unusable = 0
    for j, r in enumerate(rows):
        group = [(judge(c), g, c) for g, c in zip(replies[j * options.k:(j + 1) * options.k],
                                                   coded[j * options.k:(j + 1) * options.k])
                 if usable(g.text, specials)]
        if len(group) < 2:
            unusable += 1
            continue
        best = max(group, key=lambda x: x[0])
        worst = min(group, key=lambda x: x[0])
        if best[0] == worst[0]:
            ties += 1
            continue
        pairs.append(PreferencePair(
            id=f"{r.id}/{prefer}", prompt=[{"role": "user", "content": r.text}], chosen=best[1].text,
            rejected=worst[1].text, score_chosen=best[0], score_rejected=worst[0],
            meta={"context": name, "kind": prefer, "item_id": r.id, "topic": r.topic,
                  "codes_chosen": list(best[2].codes), "codes_rejected": list(worst[2].codes),
                  "chosen_hit_limit": best[1].hit_limit, "rejected_hit_limit": worst[1].hit_limit}))
    n = max(1, len(pairs))
    info = {"disclosures": len(rows), "k": options.k, "judge": prefer, "pairs": len(pairs),
            "pairs_by_kind": {prefer: len(pairs)}, "skipped_ties": ties, "skipped_unusable": unusable,
            "advice_share_chosen": sum(p.meta["codes_chosen"].count("advice") / max(1, len(p.meta["codes_chosen"]))
                                       for p in pairs) / n,
            "advice_share_rejected": sum(p.meta["codes_rejected"].count("advice") / max(1, len(p.meta["codes_rejected"]))
                                         for p in pairs) / n,
            "samples_hit_limit": sum(g.hit_limit for g in replies)}
    return ContextData(pairs=pairs, info=info)


CONTEXT = ContextSpec(name=NAME, options=Options, build=build, quick={"n_disclosures": 8, "k": 2, "max_new_tokens": 64},
                      file_options=("messages",), banks=("care/disclosures.jsonl", "care/reply_sentences.jsonl"))
