"""DuET-PD training dialogues (arXiv:2508.17450), shared by please-user, resist-only and holistic.

Everything the model sees is built by the persuasion probe's own builders, so training transfers to the measurement:
the question is `stance.ask` (lettered options for `letter`, the bare question for `cloze`), the user's push is
`persuasion.persuasion_message`, options are named with `stance.claim`, and a stance answer is the letter ("B") or
the cloze reply ("The answer is Paris.") that `stance.read` scores.

1. Turn 0 (on-policy): each train item is asked once; the neutral stance is read as the probe reads it and the
   model's own greedy reply becomes the assistant's opening turn (the model's own words, as in the probe).
2. Directions: items the model answers correctly open NEG dialogues (misleading persuasion towards `target`),
   items it answers wrongly open POS dialogues (corrective persuasion towards `answer`).
   Too few of a needed direction (fewer than `min_fraction` of the items) is topped up with template openings:
   a NEG dialogue on a wrongly answered item opens with the `initial` template naming the correct answer; a POS
   dialogue on a correctly answered item opens with the `initial` template naming the target (the assistant
   "said" the wrong answer). `Plan.opening_source` and the pair meta record which dialogues these are.
3. Turns 1..T: the user's push in a technique drawn per item (seeded) from the appeal techniques; the ideal reply
   of the context's kind joins the history (DuET-PD builds later turns on the intended replies, not the model's);
   the model's own greedy reply to exactly that prompt is generated (batched, all dialogues per turn together)
   when the context needs it as the rejected side. (DuET-PD's rejected reply came from the model's own dialogue,
   whose history held its own replies; generating it for the pair's prompt keeps the rejected side on-policy.)
"""
from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dpolab.contexts import ideal as ideal_mod
from dpolab.contexts.base import cap, check_choice, check_min, special_strings, usable
from dpolab.data.schema import PreferencePair
from dpolab.errors import ConfigError
from dpolab.models.chat import ChatModel, Conversation, Generation
from dpolab import stance as stance_mod
from dpolab.progress import NullProgress, Progress
from dpolab.banks import (
    TECHNIQUES,
    Appeal,
    Item,
    bank_items,
    read_appeals,
    read_items,
    spread,
    stable_hash,
)
from dpolab.probes.persuasion import persuasion_message
from dpolab.stance import Calibration, Stance


@dataclass(frozen=True, kw_only=True)
class PersuasionOptions:
    """n_items: train items (spread over categories and domains); each opens `techniques_per_item` dialogues.
    turns: persuasion turns per dialogue (DuET-PD uses 3); each turn gives a response pair and a stance pair.
    techniques: appeal techniques to draw from (a subset of dpolab.banks.TECHNIQUES).
    techniques_per_item: techniques drawn per item and direction (seeded); DuET-PD runs all of them.
    stance: how stance answers are written: "letter" ("B"), "cloze" ("The answer is Paris.") or "auto" (calibrate
        on train items as the probe does; pass the eval's reader to be sure they match).
    max_new_tokens: bound on the model's own replies (the probe's default: replies look as they do there).
    min_fraction: a needed direction with fewer dialogue items than this fraction of the items is topped up with
        template openings (see the module docstring).
    ideal: "templates" (dpolab/assets/ideal_replies.jsonl) or "endpoint" (an OpenAI-compatible server, see
        dpolab.contexts.ideal).
    items: a JSONL of MCQ items replacing the shipped bank's train split (all its rows are used).
    appeals: a JSONL of appeal templates replacing the shipped bank.
    """

    n_items: int | None = 40
    turns: int = 3
    techniques: tuple[str, ...] = TECHNIQUES
    techniques_per_item: int = 1
    stance: str = "auto"
    max_new_tokens: int = 40
    min_fraction: float = 0.1
    ideal: Literal["templates", "endpoint"] = "templates"
    items: str | None = None
    appeals: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.techniques) - set(TECHNIQUES))
        if unknown:
            raise ConfigError(f"unknown technique(s) {', '.join(unknown)}; choose from {', '.join(TECHNIQUES)}")
        if not self.techniques:
            raise ConfigError("techniques is empty")
        check_min("n_items", self.n_items, 1)
        check_min("turns", self.turns, 1)
        check_min("techniques_per_item", self.techniques_per_item, 1)
        if self.techniques_per_item > len(self.techniques):
            raise ConfigError(f"techniques_per_item {self.techniques_per_item} exceeds the "
                              f"{len(self.techniques)} techniques given")
        check_min("max_new_tokens", self.max_new_tokens, 1)
        if not 0 <= self.min_fraction <= 1:
            raise ConfigError(f"min_fraction must be between 0 and 1, got {self.min_fraction}")
        check_choice("ideal", self.ideal, ideal_mod.SOURCES)
        check_choice("stance", self.stance, stance_mod.STANCE_CHOICES)


# -- formats shared with the probe -----------------------------------------------------------------------------

def stance_text(item: Item, index: int, reader: str) -> str:
    """The assistant's stance answer naming option `index`, as the probe's reader scores it."""
    return stance_mod.reader(reader).answer(item, index)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# -- setup -----------------------------------------------------------------------------------------------------

@dataclass
class Setup:
    items: list[Item]
    reader: str
    calibration: Calibration
    appeals: list[Appeal]
    items_source: str
    targets_assigned: list[str]


def calibrate(model: ChatModel, pool: Sequence[Item], *, requested: str, seed: int, source: str,
              limit: int | None = None) -> Calibration:
    """The probe's calibration (CALIBRATION_ITEMS spread items, capped by limit), here on train items; remembered
    with the probes' (stance.calibrated), so the contexts built from one model calibrate once."""
    n = cap(stance_mod.CALIBRATION_ITEMS, limit)
    return stance_mod.calibrated(model, spread(pool, n, seed=seed), requested=requested, key=("train", source, seed, n))


def setup(model: ChatModel, options: PersuasionOptions, *, seed: int, limit: int | None) -> Setup:
    """Train items (spread, capped), the stance reader and the appeals."""
    pool = read_items(options.items) if options.items else bank_items("train")
    items = spread(pool, cap(options.n_items, limit), seed=seed)
    calibration = calibrate(model, pool, requested=options.stance, seed=seed, source=options.items or "bank:train",
                            limit=limit)
    targeted = stance_mod.with_targets(model, items, calibration.reader)
    return Setup(items=targeted.items, reader=calibration.reader, calibration=calibration,
                 appeals=read_appeals(options.appeals), items_source=options.items or "bank:train",
                 targets_assigned=targeted.assigned)


# -- turn 0 ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Opening:
    """Turn 0 of an item: its neutral stance and the model's own reply (the `initial` template when unusable)."""

    item: Item
    stance: Stance
    reply: str
    own: bool

    @property
    def correct(self) -> bool:
        return self.stance.choice == self.item.answer


def openings(model: ChatModel, items: Sequence[Item], reader: str, *, max_new_tokens: int,
             seed: int) -> list[Opening]:
    """Ask every item once: read the stance and generate the greedy reply, both batched, as the probe does."""
    asks: list[Conversation] = [[user(stance_mod.ask(it, reader))] for it in items]
    replies = model.generate(asks, max_new_tokens=max_new_tokens)  # first, so the stance read reuses its cache
    stances = stance_mod.read(model, asks, items, reader)
    specials = special_strings(model)
    out = []
    for it, st, rep in zip(items, stances, replies):
        if usable(rep.text, specials):
            out.append(Opening(it, st, rep.text, own=True))
        else:
            said = ideal_mod.template_reply(_initial(it, st.choice, reader, ("opening",)), seed=seed)
            out.append(Opening(it, st, said, own=False))
    return out


def _initial(item: Item, index: int, reader: str, key: tuple) -> ideal_mod.Request:
    return ideal_mod.Request("initial", [user(stance_mod.ask(item, reader))],
                             {"answer": stance_mod.claim(item, index, reader)}, key=(item.id, *key))


def baseline_pairs(context: str, opened: Sequence[Opening], reader: str) -> list[PreferencePair]:
    """DuET-PD's baseline pairs: the question alone; chosen = the correct answer, rejected = the target when the
    model answered correctly, else the model's own wrong answer."""
    pairs = []
    for o in opened:
        it = o.item
        wrong = it.target if o.correct else o.stance.choice
        pairs.append(PreferencePair(
            id=f"{it.id}/baseline",
            prompt=[user(stance_mod.ask(it, reader))],
            chosen=stance_text(it, it.answer, reader),
            rejected=stance_text(it, wrong, reader),  # type: ignore[arg-type]
            meta={**_item_meta(context, "baseline", it, reader), "turn": 0, "model_correct": o.correct,
                  "rejected_option": wrong},
        ))
    return pairs


# -- planning dialogues ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """One dialogue to build: an item, a direction, a technique and the assistant's opening turn."""

    item: Item
    direction: str  # "neg": pushes item.target; "pos": pushes item.answer
    technique: str
    opening: str
    opening_source: str  # "own": the model's reply; "template": a top-up opening (see the module docstring)
    held: int  # the option the opening stands for

    @property
    def pushed(self) -> int:
        return self.item.target if self.direction == "neg" else self.item.answer  # type: ignore[return-value]


@dataclass
class Planned:
    plans: list[Plan]
    counts: dict[str, int]  # dialogue items per direction and source


def plan(opened: Sequence[Opening], *, directions: Sequence[str], techniques: Sequence[str],
         techniques_per_item: int, min_fraction: float, neg_pos_ratio: float | None = None,
         reader: str, seed: int) -> Planned:
    """Which items open which dialogues.

    NEG: the correctly answered items, topped up (if fewer than min_fraction of the items) with wrongly answered
    ones opening on the correct answer's template. POS: the wrongly answered items; with neg_pos_ratio (NEG:POS
    dialogue items) their number is set to round(n_neg / ratio), subsampling them or topping up with correctly
    answered items opening on the target's template; without it the natural number is kept unless below
    min_fraction of the items, which is then topped up the same way.
    """
    n = len(opened)
    floor = math.ceil(min_fraction * n)
    correct = [o for o in opened if o.correct]
    wrong = [o for o in opened if not o.correct]
    rng = random.Random(stable_hash(seed, "plan"))
    chosen: dict[str, list[tuple[Opening, str]]] = {}  # direction -> (opening, source)
    if "neg" in directions:
        extra = _shuffled(wrong, rng)[: max(0, floor - len(correct))]
        chosen["neg"] = [(o, "own") for o in correct] + [(o, "template") for o in extra]
    if "pos" in directions:
        if neg_pos_ratio is not None:
            want = round(len(chosen.get("neg", correct)) / neg_pos_ratio)
        else:
            want = max(len(wrong), floor)
        own = _shuffled(wrong, rng)[:want] if len(wrong) > want else list(wrong)
        extra = _shuffled(correct, rng)[: max(0, want - len(own))]
        chosen["pos"] = [(o, "own") for o in own] + [(o, "template") for o in extra]
    plans: list[Plan] = []
    counts: dict[str, int] = {}
    for direction, picked in chosen.items():
        for o, source in picked:
            counts[f"{direction}_items_{source}"] = counts.get(f"{direction}_items_{source}", 0) + 1
            it = o.item
            if source == "own":
                opening, held = o.reply, o.stance.choice
            else:
                held = it.answer if direction == "neg" else it.target  # type: ignore[assignment]
                opening = ideal_mod.template_reply(_initial(it, held, reader, ("topup", direction)), seed=seed)
            draw = random.Random(stable_hash(seed, it.id, direction, "techniques"))
            for tech in draw.sample(list(techniques), techniques_per_item):
                plans.append(Plan(it, direction, tech, opening, source, held))
    return Planned(plans=plans, counts=counts)


def _shuffled(rows: Sequence[Opening], rng: random.Random) -> list[Opening]:
    out = list(rows)
    rng.shuffle(out)
    return out


# -- running dialogues -----------------------------------------------------------------------------------------

@dataclass
class Exchange:
    """One persuasion turn of a planned dialogue.

    prompt: the conversation up to and including the user's push at this turn (ideal replies in the history).
    replies: the ideal reply of each kind the context asked for, to this prompt.
    own: the model's own greedy reply to this prompt (None when the context does not use it).
    """

    plan: Plan
    turn: int
    persuasion: str
    prompt: Conversation
    replies: dict[str, str]
    own: Generation | None = None

    def stance_prompt(self, kind: str, reader: str) -> Conversation:
        """The stance check after the `kind` reply: the probe's re-asked question (it never joins the history)."""
        return [*self.prompt, assistant(self.replies[kind]), user(stance_mod.ask(self.plan.item, reader))]


def slots(plan_: Plan, kind: str, reader: str) -> dict[str, str]:
    it, name = plan_.item, lambda i: stance_mod.claim(plan_.item, i, reader)
    if kind == "refute":
        return {"answer": name(it.answer), "claim": name(plan_.pushed)}
    if kind == "affirm":
        return {"answer": name(it.answer), "previous": name(plan_.held)}
    if kind == "concede":
        return {"claim": name(plan_.pushed)}
    raise ValueError(f"no slots for reply kind {kind!r}")


def converse(model: ChatModel, plans: Sequence[Plan], *, turns: int, reader: str, appeals: Sequence[Appeal],
             seed: int, writer: ideal_mod.IdealWriter, kinds: Callable[[Plan], Sequence[str]],
             history_kind: Callable[[Plan], str], own_replies: bool, max_new_tokens: int,
             progress: Progress | None = None) -> list[Exchange]:
    """Run every planned dialogue, all advancing together turn by turn.

    kinds(plan): the ideal reply kinds to write at each turn; history_kind(plan): the one that joins the history.
    own_replies: also generate the model's own greedy reply to each turn's prompt (one batch per turn, so the
    model's prefix cache reuses the shared history).
    """
    task = (progress or NullProgress()).task("context: dialogues", total=turns)
    histories: list[Conversation] = [[user(stance_mod.ask(p.item, reader)), assistant(p.opening)] for p in plans]
    exchanges: list[Exchange] = []
    for turn in range(1, turns + 1):
        task.describe(f"context: turn {turn}/{turns}, {len(plans)} dialogues")
        current: list[Exchange] = []
        requests: list[ideal_mod.Request] = []
        for p, hist in zip(plans, histories):
            msg = persuasion_message(p.item, pushed=p.pushed, technique=p.technique, direction=p.direction,
                                     turn=turn, reader=reader, appeals=appeals, seed=seed)
            prompt = [*hist, user(msg)]
            current.append(Exchange(p, turn, msg, prompt, {}))
            for kind in kinds(p):
                requests.append(ideal_mod.Request(kind, prompt, slots(p, kind, reader),
                                                  key=(p.item.id, p.technique, p.direction), turn=turn))
        written = iter(writer.write(requests))
        for ex in current:
            ex.replies = {kind: next(written) for kind in kinds(ex.plan)}
        if own_replies and current:
            for ex, rep in zip(current, model.generate([ex.prompt for ex in current], max_new_tokens=max_new_tokens)):
                ex.own = rep
        for i, ex in enumerate(current):
            histories[i] = [*ex.prompt, assistant(ex.replies[history_kind(ex.plan)])]
        exchanges.extend(current)
        task.advance()
    return exchanges


# -- pairs -----------------------------------------------------------------------------------------------------

def _item_meta(context: str, kind: str, item: Item, reader: str) -> dict[str, Any]:
    return {"context": context, "kind": kind, "item_id": item.id, "domain": item.domain, "category": item.category,
            "reader": reader, "answer": item.answer, "target": item.target}


def exchange_meta(context: str, kind: str, ex: Exchange, reader: str) -> dict[str, Any]:
    p = ex.plan
    return {**_item_meta(context, kind, p.item, reader), "direction": p.direction, "technique": p.technique,
            "turn": ex.turn, "pushed": p.pushed, "held": p.held, "opening_source": p.opening_source}


def exchange_id(ex: Exchange, kind: str) -> str:
    p = ex.plan
    return f"{p.item.id}/{p.direction}/{p.technique}/t{ex.turn}/{kind}"


@dataclass
class PairLog:
    """Pairs built, and pairs skipped with the reason, for the build's info."""

    pairs: list[PreferencePair] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def add(self, pair: PreferencePair) -> None:
        if pair.chosen == pair.rejected:
            self.skipped[f"{pair.meta['kind']}: chosen equals rejected"] += 1
        else:
            self.pairs.append(pair)

    def info(self) -> dict[str, Any]:
        return {"pairs": len(self.pairs), "pairs_by_kind": dict(Counter(p.meta["kind"] for p in self.pairs)),
                "skipped": dict(self.skipped)}


def response_pair(log: PairLog, context: str, kind: str, ex: Exchange, *, chosen: str, rejected: str | None,
                  reader: str, specials: tuple[str, ...], rejected_source: str) -> None:
    """A reply pair at this turn; an unusable own reply (blank, or holding a special token) is skipped."""
    if rejected is None or not usable(rejected, specials):
        log.skipped[f"{kind}: unusable own reply"] += 1
        return
    meta = {**exchange_meta(context, kind, ex, reader), "rejected_source": rejected_source}
    if rejected_source == "own" and ex.own is not None:
        meta["own_hit_limit"] = ex.own.hit_limit
    log.add(PreferencePair(id=exchange_id(ex, kind), prompt=ex.prompt, chosen=chosen, rejected=rejected, meta=meta))


def stance_pair(log: PairLog, context: str, kind: str, ex: Exchange, *, after: str, chosen: int, rejected: int,
                reader: str) -> None:
    """A stance pair at this turn: the probe's stance check after the `after` reply; options as stance answers."""
    it = ex.plan.item
    log.add(PreferencePair(
        id=exchange_id(ex, kind), prompt=ex.stance_prompt(after, reader),
        chosen=stance_text(it, chosen, reader), rejected=stance_text(it, rejected, reader),
        meta={**exchange_meta(context, kind, ex, reader), "chosen_option": chosen, "rejected_option": rejected},
    ))


def setup_info(s: Setup, opened: Sequence[Opening], planned: Planned, options: PersuasionOptions,
               writer: ideal_mod.IdealWriter) -> dict[str, Any]:
    return {
        "reader": s.reader,
        "calibration": s.calibration.to_json(),
        "items": len(s.items),
        "items_source": s.items_source,
        "targets_assigned_by_model": len(s.targets_assigned),
        "turn0_correct": sum(o.correct for o in opened),
        "turn0_own_replies_replaced": sum(not o.own for o in opened),
        "dialogue_items": planned.counts,
        "dialogues": len(planned.plans),
        "turns": options.turns,
        "techniques": list(options.techniques),
        "techniques_per_item": options.techniques_per_item,
        "ideal": options.ideal,
        **writer.stats,
    }
