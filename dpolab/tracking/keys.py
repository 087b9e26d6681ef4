"""Names trackers accept: a config flattened to dotted params, and probe metric names mapped to metric keys.

MLflow (and so every tracker, to keep one spelling) takes keys of letters, digits, `_ - . /` and spaces (a colon
too, except on Windows), at most 250 characters, that are unchanged by path normalisation (no leading or trailing
`/`, no `//`, no `.` or `..` segment); a param value of at most 6000 characters. The mapping of a result row's
metric name to a key, applied in this order:

    @  -> _at     neg_acc@3                  -> neg_acc_at3
    |  -> .       accuracy|domain=knowledge  -> accuracy.domain-knowledge
    =  -> -
    :  -> .       balance:uptake:helpful     -> balance.uptake.helpful
    any other character outside [A-Za-z0-9_.-] (a `/` in a probe or metric name included) -> _

A result row becomes one metric per numeric field, `<field>/<probe>/<metric>` (e.g. `delta/persuasion/neg_acc_at3`),
with `<context>/<method>/` after the field for rows pooled over seeds (e.g. `delta/detox/dpo/toxicity/mean`), and
its verdict as `verdict/...` = +1 improved, -1 harmed, 0 no clear change. Two names that map to one key in the same
call keep it apart by a suffix `-h` + six hex digits of the original name's sha1.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from dpolab.experiment.results import ResultRow

MAX_KEY = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
MAX_PARAM_VALUE = 6000  # MLflow's MAX_PARAM_VAL_LENGTH
_REPLACE = (("@", "_at"), ("|", "."), ("=", "-"), (":", "."))
_INVALID = re.compile(r"[^A-Za-z0-9_.\-]")
_INVALID_PATH = re.compile(r"[^A-Za-z0-9_.\-/]")
# the row fields that are not measurements: which cell and how many seeds
_NOT_MEASURED = frozenset({"seed", "seeds"})
VERDICT_VALUES = {"improved": 1.0, "harmed": -1.0, "no clear change": 0.0}


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def _fit(key: str, original: str) -> str:
    """At most MAX_KEY characters; a cut key ends with the original's hash, so two long names stay apart."""
    if len(key) <= MAX_KEY:
        return key
    suffix = f"-h{_short_hash(original)}"
    return key[: MAX_KEY - len(suffix)].rstrip("/") + suffix


def name_part(name: str) -> str:
    """One segment of a key (a probe, a metric, a context): the table above, no `/` left."""
    for old, new in _REPLACE:
        name = name.replace(old, new)
    name = _INVALID.sub("_", name)
    return "_" if name in ("", ".", "..") else name


def metric_key(name: str) -> str:
    """A key for a name that may already be a path (`rewards/chosen` stays as it is): each `/`-separated segment
    mapped as name_part maps a name, empty segments dropped."""
    mapped = name
    for old, new in _REPLACE:
        mapped = mapped.replace(old, new)
    parts = [("_" if p in (".", "..") else p) for p in _INVALID_PATH.sub("_", mapped).split("/") if p]
    return _fit("/".join(parts) or "_", name)


def unique_keys(names: Iterable[str], key=metric_key) -> dict[str, str]:
    """name -> key for every name; names whose keys collide each get a hash suffix."""
    names = list(dict.fromkeys(names))
    keys = {n: key(n) for n in names}
    seen: dict[str, int] = {}
    for k in keys.values():
        seen[k] = seen.get(k, 0) + 1
    return {n: (_fit(k, n) if seen[k] == 1 else _fit(f"{k}-h{_short_hash(n)}", n)) for n, k in keys.items()}


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> text values (`loss_args.alpha` -> "0.5"); lists as JSON (`[0, 1]`), an
    empty mapping as `{}`. A value over MAX_PARAM_VALUE characters is cut, ending with how much was cut."""
    out: dict[str, str] = {}
    for k, v in data.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, prefix=f"{dotted}."))
            continue
        text = _value_text(dict(v) if isinstance(v, Mapping) else v)
        if len(text) > MAX_PARAM_VALUE:
            note = f" ... [truncated: {len(text)} characters in all]"
            text = text[: MAX_PARAM_VALUE - len(note)] + note
        out[dotted] = text
    keys = unique_keys(out, key=lambda n: _fit(_INVALID.sub("_", n), n))
    return {keys[k]: v for k, v in out.items()}


def row_metrics(rows: Iterable["ResultRow"], *, pooled: bool | None = None) -> dict[str, float]:
    """The metrics of result rows (see the module docstring). pooled: put `<context>/<method>/` in the key; by
    default when a row has no seed (pooled over seeds), i.e. when one call holds several cells' rows."""
    values: dict[tuple[str, ...], float] = {}
    for row in rows:
        record = row.record()
        several_cells = (record["seed"] is None) if pooled is None else pooled
        where = (record["context"], record["method"]) if several_cells else ()
        name = (record["probe"], record["metric"])
        for field, v in record.items():
            if field in _NOT_MEASURED or isinstance(v, bool):
                continue
            if field.startswith("verdict") and isinstance(v, str):
                v = VERDICT_VALUES.get(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values[(field, *where, *name)] = float(v)
    keys = unique_keys(("\x00".join(path) for path in values), key=row_path_key)  # parts joined losslessly
    return {keys["\x00".join(path)]: v for path, v in values.items()}


def row_path_key(path: str) -> str:
    """A key from a path joined by NUL between parts (row_metrics's internal spelling)."""
    return _fit("/".join(name_part(p) for p in path.split("\x00")), path)


def rows_markdown(rows: Iterable["ResultRow"]) -> str:
    """The rows as a Markdown table (TensorBoard's text tab, MLflow's results.md): what changed and how sure."""
    def num(v):
        return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"

    lines = ["| context | method | seed | probe | metric | value | baseline | delta | 95% CI | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row.record()
        ci = f"[{num(r['delta_ci_low'])}, {num(r['delta_ci_high'])}]" if r["delta_ci_low"] is not None else ""
        cells = [r["context"], r["method"], "" if r["seed"] is None else str(r["seed"]), r["probe"], r["metric"],
                 num(r["value"]), num(r["baseline"]), num(r["delta"]), ci, str(r["verdict"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
