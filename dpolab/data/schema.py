"""The preference-pair schema: one raw row (a dict from any reader) -> a PreferencePair, or the Problems that make it bad.

Row rules (TRL's formats; dpolab always renders prompts with the model's chat template):

- `prompt`, `chosen`, `rejected` are each a string or a list of `{"role", "content"}` messages, and may be mixed.
  A string prompt is one user message; a string chosen/rejected is one assistant message; a missing prompt
  means chosen and rejected are whole conversations ("implicit prompt").
- The prompt is every message before the FINAL assistant turn: prompt messages + all but the last message of
  chosen. Those leading messages must be identical in chosen and rejected. chosen/rejected are the contents of
  the final assistant messages.
- Roles: system, user, assistant (tool turns are not supported). An optional system message comes first, then
  user and assistant take turns starting with user, so the prompt ends with a user message.
- Optional: `score_chosen` and `score_rejected` (finite numbers, both or neither), `weight` (finite, >= 0;
  default 1.0), `id` (string or integer; default `row-N`, N the 0-based row number; unique), `meta` (an object,
  or a JSON string holding one).
- Any other column is kept in `meta` under its own name (never dropped); a clash with a key already in `meta`
  makes the row bad.
- Message dicts keep extra keys (e.g. `name`) unless their value is null: columnar formats fill a key present in
  some messages with null in all the others.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
KNOWN_FIELDS = ("id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "weight", "meta")
MAX_LISTED_PROBLEMS = 50
_LOOKS_LIKE_MESSAGES = re.compile(r"\s*\[\s*\{")


@dataclass
class PreferencePair:
    id: str
    prompt: list[dict]  # messages [{"role", "content"}] before the final assistant turn
    chosen: str  # final assistant message content
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None
    weight: float = 1.0
    meta: dict = field(default_factory=dict)
    source: str = ""  # "file:line" (or "file row N"), for messages


@dataclass
class Location:
    """Where a row sits: a 1-based line of a text file (JSONL, CSV) or a 0-based row index (JSON list, Parquet, datasets)."""

    file: str
    line: int | None
    unit: str = "line"  # "line" or "row"

    def __str__(self) -> str:
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file} row {self.line}"

    def problem(self, field: str | None, reason: str) -> Problem:
        return Problem(file=self.file, line=self.line, field=field, reason=reason, unit=self.unit)


@dataclass
class Problem:
    """One bad row (or, with line None, a problem with the whole file)."""

    file: str
    line: int | None  # 1-based line for JSONL/CSV, 0-based row index for JSON lists, Parquet and datasets folders
    field: str | None  # e.g. "chosen", "prompt[1].content"; None when the whole row is unreadable
    reason: str
    unit: str = "line"  # "line" or "row": how `line` counts

    def __str__(self) -> str:
        where = str(Location(self.file, self.line, self.unit))
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.reason}"


def format_problems(problems: list, *, limit: int = MAX_LISTED_PROBLEMS) -> str:
    """One problem per line, at most `limit` lines plus "... and N more"."""
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _RowChecker:
    """Collects the problems of one row while its fields are parsed."""

    def __init__(self, where: Location, text_cells: bool):
        self.where = where
        self.text_cells = text_cells  # CSV: every cell is a string; "" means absent, lists are JSON strings
        self.problems: list[Problem] = []

    def bad(self, field: str | None, reason: str) -> None:
        self.problems.append(self.where.problem(field, reason))

    def absent(self, value: Any) -> bool:
        return value is None or (self.text_cells and isinstance(value, str) and value.strip() == "")

    def messages(self, name: str, value: Any, single_role: str) -> list[dict] | None:
        """A string or a list of messages -> a list of messages; None (after recording why) if malformed."""
        if self.absent(value):
            self.bad(name, "missing")
            return None
        if self.text_cells and isinstance(value, str) and value.lstrip().startswith("["):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                if _LOOKS_LIKE_MESSAGES.match(value):
                    self.bad(name, f"looks like a JSON list of messages but is not valid JSON: {exc.msg} (column {exc.colno})")
                    return None
                parsed = None  # text that merely starts with "[": keep it as a string
            if isinstance(parsed, list):
                value = parsed
        if isinstance(value, str):
            if not value.strip():
                self.bad(name, "empty")
                return None
            return [{"role": single_role, "content": value}]
        if not isinstance(value, list):
            self.bad(name, f"must be a string or a list of messages, got {_type_name(value)} ({_show(value)})")
            return None
        if not value:
            self.bad(name, "empty")
            return None
        out, ok = [], True
        for i, message in enumerate(value):
            here = f"{name}[{i}]"
            if not isinstance(message, dict):
                self.bad(here, f"must be a message object with 'role' and 'content', got {_type_name(message)}")
                ok = False
                continue
            message = {k: v for k, v in message.items() if v is not None}
            role, content = message.get("role"), message.get("content")
            if role is None:
                self.bad(f"{here}.role", "missing")
                ok = False
            elif role not in ROLES:
                self.bad(f"{here}.role", f"unknown role {_show(role)}; allowed: {', '.join(ROLES)}")
                ok = False
            if content is None:
                self.bad(f"{here}.content", "missing")
                ok = False
            elif not isinstance(content, str):
                self.bad(f"{here}.content", f"must be a string, got {_type_name(content)}")
                ok = False
            elif not content.strip():
                self.bad(f"{here}.content", "empty")
                ok = False
            out.append(message)
        return out if ok else None

    def number(self, name: str, value: Any) -> float | None:
        """A finite number (numeric strings accepted); None if absent or bad (bad ones are recorded)."""
        if self.absent(value):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            self.bad(name, f"must be a number, got {_type_name(value)} ({_show(value)})")
            return None
        try:
            number = float(value)
        except ValueError:
            self.bad(name, f"must be a number, got {_show(value)}")
            return None
        if not math.isfinite(number):
            self.bad(name, f"must be a finite number, got {_show(value)}")
            return None
        return number

    def identifier(self, value: Any, index: int) -> str | None:
        if self.absent(value):
            return f"row-{index}"
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.bad("id", f"must be a string or an integer, got {_type_name(value)}")
            return None
        if isinstance(value, str) and not value.strip():
            self.bad("id", "empty")
            return None
        return str(value)

    def meta(self, value: Any) -> dict | None:
        if self.absent(value):
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                self.bad("meta", f"must be an object or a JSON string of one; invalid JSON: {exc.msg}")
                return None
        if not isinstance(value, dict):
            self.bad("meta", f"must be an object, got {_type_name(value)}")
            return None
        return dict(value)


def _roles_ok(roles: list[str]) -> bool:
    """Optional system first, then user/assistant alternating from user, ending with the final assistant turn."""
    turns = roles[1:] if roles[:1] == ["system"] else roles
    return len(turns) >= 2 and all(role == ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(turns))


@dataclass
class ParsedRow:
    pair: PreferencePair | None  # None when the row is bad
    problems: list[Problem]


def parse_row(record: dict, *, index: int, where: Location, text_cells: bool = False) -> ParsedRow:
    """Parse one raw row. index: 0-based row number (for the default id); text_cells: CSV cells (all strings)."""
    check = _RowChecker(where, text_cells)
    pair_id = check.identifier(record.get("id"), index)
    prompt_given = not check.absent(record.get("prompt"))
    prompt = check.messages("prompt", record["prompt"], "user") if prompt_given else []
    chosen = check.messages("chosen", record.get("chosen"), "assistant")
    rejected = check.messages("rejected", record.get("rejected"), "assistant")
    score_chosen = check.number("score_chosen", record.get("score_chosen"))
    score_rejected = check.number("score_rejected", record.get("score_rejected"))
    weight = check.number("weight", record.get("weight"))
    if weight is not None and weight < 0:
        check.bad("weight", f"must be >= 0, got {weight}")
    meta = check.meta(record.get("meta"))

    for mine, other in (("score_chosen", "score_rejected"), ("score_rejected", "score_chosen")):
        if check.absent(record.get(other)) and not check.absent(record.get(mine)):
            check.bad(other, f"missing while {mine} is given; give both scores or neither")

    if meta is not None:
        for key, value in record.items():
            if key in KNOWN_FIELDS:
                continue
            if key is None:  # csv.DictReader's key for cells beyond the header
                check.bad(None, f"row has {len(value)} more cell(s) than the header")
            elif key in meta:
                check.bad(key, "also a key of 'meta'; rename the column or the meta key")
            else:
                meta[key] = value

    if prompt is not None and chosen is not None and rejected is not None:
        _check_conversation(check, prompt, chosen, rejected, conv_field="prompt" if prompt_given else "chosen")

    if check.problems:
        return ParsedRow(pair=None, problems=check.problems)
    return ParsedRow(pair=PreferencePair(
        id=pair_id,
        prompt=prompt + chosen[:-1],
        chosen=chosen[-1]["content"],
        rejected=rejected[-1]["content"],
        score_chosen=score_chosen,
        score_rejected=score_rejected,
        weight=1.0 if weight is None else weight,
        meta=meta,
        source=str(where),
    ), problems=[])


def _check_conversation(check: _RowChecker, prompt: list[dict], chosen: list[dict], rejected: list[dict], *, conv_field: str) -> None:
    """The structure rules: shared leading messages, a final assistant turn, the role order, two different answers."""
    structure_ok = True
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer[-1]["role"] != "assistant":
            check.bad(name, f"the final message must be from the assistant, got {answer[-1]['role']!r}")
            structure_ok = False
    lead_c, lead_r = chosen[:-1], rejected[:-1]
    if lead_c != lead_r:
        differ = next((i for i, (a, b) in enumerate(zip(lead_c, lead_r)) if a != b), min(len(lead_c), len(lead_r)))
        check.bad("rejected", "chosen and rejected must share every message before the final assistant turn; "
                  f"they differ at message {differ}")
        structure_ok = False
    elif not prompt and not lead_c:
        check.bad("prompt", "missing: give a prompt, or chosen/rejected conversations that start with it")
        structure_ok = False
    if structure_ok:
        roles = [m["role"] for m in prompt + chosen]
        if not _roles_ok(roles):
            check.bad(conv_field, "roles must be an optional system message, then user and assistant taking turns "
                      f"from user, so the prompt ends with a user message; got {', '.join(roles)}")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        check.bad("chosen", "chosen is identical to rejected")
