"""Item banks, shared by probes (test split) and contexts (train split): MCQ items, appeals, toxicity prompts,
instructions, self-report questions.

Schemas are pydantic models; readers fail at load with the file, line and field. Banks ship in dpolab/assets;
every item-based probe also takes a user file in the same schema (e.g. an export of MMLU-Pro or SALAD-Bench).
"""
from __future__ import annotations

import json
import random
import zlib
from collections import defaultdict
from collections.abc import Sequence
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
    """A question asking the model to rate one of its own tendencies from 1 to 5."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    behaviour: str
    question: str
    higher_means: str  # what a higher rating says about the behaviour, e.g. "more yielding" or "less verbose"


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
