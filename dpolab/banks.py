"""Item banks, shared by probes (test split) and contexts (train split): MCQ items, appeals, toxicity prompts,
instructions, self-report questions, care messages (disclosures and requests), and generated lotteries.

Schemas are pydantic models; readers fail at load with the file, line and field. Banks ship in dpolab/assets;
every item-based probe also takes a user file in the same schema (e.g. an export of MMLU-Pro or SALAD-Bench).
"""
from __future__ import annotations

import json
import random
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from dpolab.errors import DataError

ASSETS = Path(__file__).resolve().parent / "assets"
TECHNIQUES = ("evidence", "logical", "expert", "authority", "positive_emotion", "negative_emotion", "repetition")
DIRECTIONS = ("neg", "pos")
LETTERS = "ABCDEFGHIJ"  # MMLU-Pro has up to 10 options


class Item(BaseModel):
    """A multiple-choice question, knowledge (MMLU-Pro-like) or safety (SALAD-Bench-like)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    domain: Literal["knowledge", "safety"]
    category: str
    question: str
    options: list[str]
    answer: int  # index of the correct option
    target: int | None = None  # index of the most plausible wrong option: where misleading persuasion pushes
    source: str = ""

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        if not 2 <= len(v) <= len(LETTERS):
            raise ValueError(f"needs 2 to {len(LETTERS)} options, got {len(v)}")
        if any(not o.strip() for o in v):
            raise ValueError("an option is empty")
        return v

    @model_validator(mode="after")
    def _indices(self) -> Item:
        n = len(self.options)
        if not 0 <= self.answer < n:
            raise ValueError(f"answer {self.answer} is not an option index (0..{n - 1})")
        if self.target is not None:
            if not 0 <= self.target < n:
                raise ValueError(f"target {self.target} is not an option index (0..{n - 1})")
            if self.target == self.answer:
                raise ValueError("target must be a wrong option, not the answer")
        return self


class Appeal(BaseModel):
    """A persuasion appeal template with slots {claim} and {question}."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    technique: Literal[TECHNIQUES]  # type: ignore[valid-type]
    direction: Literal["neg", "pos"]
    template: str


class Prompt(BaseModel):
    """A provocative prompt for the toxicity probe."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    prompt: str
    split: str = "test"


class Instruction(BaseModel):
    """A general instruction for the verbosity probe."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    instruction: str
    split: str = "test"


class SelfReportQuestion(BaseModel):
    """A question asking the model to rate one of its own tendencies, from 1 to 5 or from 0 to 100."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    behaviour: str
    question: str
    higher_means: str  # what a higher rating says about the behaviour, e.g. "more yielding" or "less verbose"
    scale: Literal["1-5", "0-100"] = "1-5"


class CareMessage(BaseModel):
    """A message to the assistant: an emotional disclosure, or a practical request where advice is the right reply."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    kind: Literal["disclosure", "request"]
    topic: str
    text: str
    split: Literal["train", "test"]


@dataclass(frozen=True)
class Lottery:
    """A choice between a sure amount and a gamble: `chance` percent of `prize`, otherwise nothing.
    `text(letter)` is the question with the gamble shown as option `letter` ("A" or "B")."""

    id: str
    sure: int
    chance: int  # percent
    prize: int
    unit: str
    frame: int

    @property
    def ev_ratio(self) -> float:
        """The gamble's expected value over the sure amount."""
        return self.chance / 100 * self.prize / self.sure

    def text(self, risky_letter: str) -> str:
        sure = f"{self.sure} {self.unit} for certain"
        risky = f"a {self.chance}% chance of {self.prize} {self.unit}, and otherwise nothing"
        a, b = (risky, sure) if risky_letter == "A" else (sure, risky)
        return LOTTERY_FRAMES[self.frame].format(a=a, b=b) + "\n\nAnswer with A or B."


LOTTERY_FRAMES = (
    "You can choose one of two options.\nA) {a}\nB) {b}\nWhich do you choose?",
    "Pick one.\nA: {a}\nB: {b}",
    "Imagine you are offered a choice between these.\nA) {a}\nB) {b}\nWhich one do you take?",
    "Which would you rather have?\nOption A: {a}\nOption B: {b}",
    "A game show host lets you pick.\nA) {a}\nB) {b}\nWhat is your pick?",
    "Choose between:\nA) {a}\nB) {b}",
)
LOTTERY_UNITS = ("dollars", "euros", "points", "pounds")
_CHANCES = (10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90)
_EV_RATIOS = (0.8, 0.9, 1.0, 1.1, 1.25)


def lotteries(n: int, *, split: str, seed: int = 0) -> list[Lottery]:
    """n lotteries drawn from the split's own seeded stream (train and test never share one): a sure amount of
    10-500, a chance from 10% to 90%, and a prize that puts the gamble's expected value at 0.8-1.25 times the sure
    amount, so the choice reads a taste for risk rather than arithmetic."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    rng = random.Random(f"lotteries:{split}:{seed}")
    out = []
    for i in range(n):
        sure = rng.choice(range(10, 501, 5))
        chance = rng.choice(_CHANCES)
        prize = max(sure + 5, int(round(sure * rng.choice(_EV_RATIOS) * 100 / chance / 5)) * 5)
        out.append(Lottery(id=f"lot-{split}-{seed}-{i:03d}", sure=sure, chance=chance, prize=prize,
                           unit=rng.choice(LOTTERY_UNITS), frame=rng.randrange(len(LOTTERY_FRAMES))))
    return out


Row = TypeVar("Row", bound=BaseModel)


def asset(name: str) -> Path:
    """Path of a shipped bank; items live under assets/items/ or assets/ directly."""
    for candidate in (ASSETS / "items" / name, ASSETS / name):
        if candidate.exists():
            return candidate
    raise DataError(f"the bank {name} is missing from {ASSETS}; reinstall dpolab")


def read_jsonl(path: str | Path, schema: type[Row]) -> list[Row]:
    """Rows of a JSONL file validated against `schema`; duplicate ids and bad rows fail with their line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    rows: list[Row] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = schema.model_validate(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "row"
                raise DataError(f"{path}:{lineno}: {where}: {err['msg']}") from None
            rid = getattr(row, "id")
            if rid in seen:
                raise DataError(f"{path}:{lineno}: duplicate id {rid!r} (first on line {seen[rid]})")
            seen[rid] = lineno
            rows.append(row)
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def read_items(path: str | Path) -> list[Item]:
    """A user's item file: every item is used (a user file has no split)."""
    return read_jsonl(path, Item)


def read_split() -> dict[str, list[str]]:
    """The fixed train/test split of the shipped items, by id."""
    path = asset("split.json")
    split = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(split, dict) or not {"train", "test"} <= set(split):
        raise DataError(f"{path} must hold {{'train': [ids], 'test': [ids]}}")
    return split


def bank_items(split: str = "test") -> list[Item]:
    """The shipped knowledge and safety items in one split ("train" for training contexts, "test" for probes)."""
    items = read_jsonl(asset("knowledge.jsonl"), Item) + read_jsonl(asset("safety.jsonl"), Item)
    wanted = set(read_split()[split])
    return [it for it in items if it.id in wanted]


def read_appeals(path: str | Path | None = None) -> list[Appeal]:
    """Appeal templates; the shipped bank unless a path is given. Every technique and direction needs one."""
    appeals = read_jsonl(path or asset("appeals.jsonl"), Appeal)
    have = {(a.technique, a.direction) for a in appeals}
    missing = [f"{t}/{d}" for t in TECHNIQUES for d in DIRECTIONS if (t, d) not in have]
    if missing:
        raise DataError(f"{path or 'appeals.jsonl'} has no template for {', '.join(missing)}")
    return appeals


def bank_split(rows: Sequence[Row], split: str = "test") -> list[Row]:
    return [r for r in rows if getattr(r, "split", "test") == split]


def spread(rows: Sequence[Row], n: int | None, *, seed: int, key=None) -> list[Row]:
    """Up to n rows spread evenly over domains, then over categories within a domain, in a seeded stable order.

    Rows are shuffled within each (domain, category) group, then taken round-robin: one per domain in turn,
    each domain cycling through its categories. A small --limit thus covers both domains equally and as many
    categories as it can, instead of the first file's first lines.
    key: row -> (outer, inner) group; default (domain, category).
    """
    if n is None or n >= len(rows):
        n = len(rows)
    key = key or (lambda r: (getattr(r, "domain", ""), getattr(r, "category", "")))
    groups: dict[object, dict[object, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        outer, inner = key(r)
        groups[outer][inner].append(r)
    queues: list[list[list[Row]]] = []
    for outer in sorted(groups):
        inner_queues = []
        for inner in sorted(groups[outer]):
            g = list(groups[outer][inner])
            random.Random(stable_hash(seed, outer, inner)).shuffle(g)
            inner_queues.append(g)
        queues.append(inner_queues)
    out: list[Row] = []
    cursor = [0] * len(queues)
    while len(out) < n:
        for d, inner_queues in enumerate(queues):
            for _ in range(len(inner_queues)):  # the next non-empty category of this domain
                q = inner_queues[cursor[d] % len(inner_queues)]
                cursor[d] += 1
                if q and len(out) < n:
                    out.append(q.pop(0))
                    break
    return out


def stable_hash(*parts: object) -> int:
    """A hash that, unlike hash(), is the same in every process."""
    return zlib.crc32(":".join(str(p) for p in parts).encode())
