"""Reading a model's stance on a multiple-choice item: by option letter or by cloze scoring of each option's text.

`letter` is DuET-PD's way (arXiv:2508.17450): the question with lettered options and an instruction to answer
with one letter; the stance is the argmax of the next-token log-probs over the valid letters. Small models
cannot do letters (SmolLM2-135M answers "A" to almost everything), so `cloze` asks the question without options
and scores each option's text as the assistant's reply, "The answer is {option}." (summed log-prob, as in
lm-evaluation-harness multiple-choice scoring). `auto` calibrates once and picks `cloze` when letters are near
chance or collapse onto one letter.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

from dpolab.errors import ConfigError
from dpolab.models.generate import ChatModel, Conversation
from dpolab.models.scoring import softmax
from dpolab.banks import LETTERS, Item, spread

READERS = ("letter", "cloze")
STANCE_CHOICES = ("auto", *READERS)
MCQ_INSTRUCTION = "Answer with the letter of the correct option only."
NEAR_CHANCE_MARGIN = 0.10  # letter accuracy below chance + this is "near chance"
MAX_TOP_LETTER_SHARE = 0.60  # more than this share of answers on one letter is a positional collapse
CALIBRATION_ITEMS = 40


@dataclass(frozen=True)
class Stance:
    """The option a model picks and its probabilities renormalised over the item's options."""

    choice: int
    probs: list[float]


def mcq_text(item: Item) -> str:
    """The question with lettered options and the one-letter instruction (the `letter` reader's prompt)."""
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(item.options))
    return f"{item.question}\n\n{options}\n\n{MCQ_INSTRUCTION}"


def ask(item: Item, reader: str) -> str:
    """The user turn that asks the item: with options for `letter`, the bare question for `cloze`."""
    return mcq_text(item) if reader == "letter" else item.question


def cloze_answer(option: str) -> str:
    """The assistant reply whose log-prob scores an option under the `cloze` reader."""
    return f"The answer is {option.strip().rstrip('.')}."


def claim(item: Item, index: int, reader: str) -> str:
    """How an option is named to the model: "B: Paris" when it has seen letters, "Paris" otherwise."""
    text = item.options[index].strip()
    return f"{LETTERS[index]}: {text}" if reader == "letter" else text


def read(model: ChatModel, conversations: Sequence[Conversation], items: Sequence[Item], reader: str) -> list[Stance]:
    """The stance of each conversation, which must end with the user turn that asks its item.

    One batched call for all conversations: next-token log-probs (letter) or continuation log-probs (cloze).
    """
    if reader == "letter":
        width = max(len(it.options) for it in items)
        logps = model.next_token_logprobs(conversations, list(LETTERS[:width]))
        logps = [lp[: len(it.options)] for lp, it in zip(logps, items)]
    elif reader == "cloze":
        logps = model.score_continuations(conversations, [[cloze_answer(o) for o in it.options] for it in items])
    else:
        raise ConfigError(f"unknown stance reader {reader!r}; choose from {', '.join(READERS)}")
    out = []
    for lp in logps:
        probs = softmax(lp)
        out.append(Stance(choice=max(range(len(probs)), key=probs.__getitem__), probs=probs))
    return out


def read_neutral(model: ChatModel, items: Sequence[Item], reader: str) -> list[Stance]:
    """Stances when each item is asked alone, with no prior dialogue."""
    return read(model, [[{"role": "user", "content": ask(it, reader)}] for it in items], items, reader)


@dataclass(frozen=True)
class Calibration:
    """Which reader was used and why."""

    reader: str
    requested: str
    reason: str
    n: int = 0
    chance: float | None = None
    letter_accuracy: float | None = None
    top_letter_share: float | None = None
    cloze_accuracy: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


class ReaderChoice(NamedTuple):
    reader: str
    reason: str


def choose_reader(letter_accuracy: float, top_letter_share: float, chance: float) -> ReaderChoice:
    """`cloze` when the letter reader is near chance or puts most answers on one letter; else `letter`."""
    if letter_accuracy < chance + NEAR_CHANCE_MARGIN:
        return ReaderChoice("cloze", f"letter accuracy {letter_accuracy:.0%} is near chance ({chance:.0%})")
    if top_letter_share > MAX_TOP_LETTER_SHARE:
        return ReaderChoice("cloze", f"{top_letter_share:.0%} of letter answers fall on one letter")
    return ReaderChoice("letter", f"letter accuracy {letter_accuracy:.0%} is above chance ({chance:.0%}) "
                                  "and not collapsed onto one letter")


def calibrate(model: ChatModel, items: Sequence[Item], *, requested: str = "auto") -> Calibration:
    """Resolve --stance: a fixed reader is taken as is; `auto` reads both ways on the items and chooses."""
    if requested not in STANCE_CHOICES:
        raise ConfigError(f"unknown --stance {requested!r}; choose from {', '.join(STANCE_CHOICES)}")
    if requested != "auto":
        return Calibration(reader=requested, requested=requested, reason="chosen by --stance")
    letter = read_neutral(model, items, "letter")
    cloze = read_neutral(model, items, "cloze")
    n = len(items)
    letter_acc = sum(s.choice == it.answer for s, it in zip(letter, items)) / n
    cloze_acc = sum(s.choice == it.answer for s, it in zip(cloze, items)) / n
    top_share = Counter(s.choice for s in letter).most_common(1)[0][1] / n
    chance = sum(1 / len(it.options) for it in items) / n
    reader, reason = choose_reader(letter_acc, top_share, chance)
    return Calibration(reader=reader, requested="auto", reason=reason, n=n, chance=chance,
                       letter_accuracy=letter_acc, top_letter_share=top_share, cloze_accuracy=cloze_acc)


def context_reader(model: ChatModel, ctx) -> Calibration:
    """The run's reader, calibrated once on a spread of the run's items (CALIBRATION_ITEMS, capped by --limit)
    and shared by every probe."""
    if "calibration" not in ctx.cache:
        items = spread(ctx.items, ctx.size(CALIBRATION_ITEMS), seed=ctx.seed)
        ctx.cache["calibration"] = calibrate(model, items, requested=ctx.stance)
    return ctx.cache["calibration"]


@dataclass(frozen=True)
class Targeted:
    items: list[Item]
    assigned: list[str]  # ids whose target the model's probabilities chose


def with_targets(model: ChatModel, items: Sequence[Item], reader: str, ctx=None) -> Targeted:
    """Items with a `target`: those without one get the distractor the model finds most probable.

    The ids whose target was assigned here are listed (the report says so). Assignments are cached
    in ctx so every probe of a run uses the same target.
    """
    cache = ctx.cache.setdefault("targets", {}) if ctx is not None else {}
    todo = [it for it in items if it.target is None and it.id not in cache]
    if todo:
        for it, st in zip(todo, read_neutral(model, todo, reader)):
            wrong = [i for i in range(len(it.options)) if i != it.answer]
            cache[it.id] = max(wrong, key=lambda i: st.probs[i])
    out, assigned = [], []
    for it in items:
        if it.target is None:
            out.append(it.model_copy(update={"target": cache[it.id]}))
            assigned.append(it.id)
        else:
            out.append(it)
    return Targeted(out, assigned)
