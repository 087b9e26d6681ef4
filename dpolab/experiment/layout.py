"""Printing result listings so they keep their meaning wherever they are read: a table on a terminal wide enough to
hold it whole, blocks of lines otherwise (a narrow terminal, a pipe, a file), or markdown, csv or json on request.

No name is ever cut: a table is only used when every cell fits its column on its own lines, and a block line that
is too long wraps between words, never inside one.
"""
from __future__ import annotations

import csv
import io
import json
import math
from enum import Enum
from typing import Any, Iterable, Sequence


class Format(str, Enum):
    """How `dpolab show` and `dpolab compare` print; the value is how --format spells it."""

    TABLE = "table"  # for reading: a table where it fits whole, blocks of lines otherwise
    MARKDOWN = "markdown"  # GitHub tables with full names
    CSV = "csv"  # one row per line, full names and unrounded numbers
    JSON = "json"  # a list of objects, as the csv rows

    __hash__ = str.__hash__


FORMAT_HELP = ("table (a table on a terminal wide enough to hold it, blocks of lines otherwise), markdown "
               "(GitHub tables), csv or json (the rows, full names and numbers)")


def fitted_table(console, headers: Sequence[str], rows: Iterable[Sequence[Any]], *, justify: Sequence[str] = (),
                 **table_kw):
    """A rich Table in which every cell shows whole on its own lines, or None when the console is not a terminal
    or is too narrow for it: the caller then prints blocks.

    Each column is as wide as its widest cell line; a header may wrap, but only between words. Cells are plain
    strings (printed as written, no markup) or rich Text."""
    from rich.cells import cell_len
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    if not console.is_terminal:
        return None
    rows = [[c if isinstance(c, Text) else Text(str(c)) for c in row] for row in rows]
    widths = [max([cell_len(w) for w in h.split()] or [1]) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], *(cell_len(line) for line in cell.plain.split("\n")))
    table = Table(**table_kw)
    for i, (header, width) in enumerate(zip(headers, widths)):
        table.add_column(header, width=width, overflow="fold", justify=justify[i] if i < len(justify) else "left")
    for row in rows:
        table.add_row(*row)
    needed = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
    return table if needed <= console.width else None


def indented(console, text, indent: int) -> None:
    """One line of a block, indented; too long for the console, it wraps between words and keeps the indent."""
    from rich.padding import Padding

    console.print(Padding(text, (0, 0, 0, indent), expand=False))


def plain(x: Any) -> Any:
    """A value as csv and json hold it: NaN as empty (None), enums as their value."""
    if isinstance(x, float) and math.isnan(x):
        return None
    return x.value if isinstance(x, Enum) else x


def to_csv(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows({k: plain(r.get(k)) for k in columns} for r in records)
    return buf.getvalue()


def to_json(records: Sequence[dict[str, Any]]) -> str:
    return json.dumps([{k: plain(v) for k, v in r.items()} for r in records], indent=2, ensure_ascii=False)


def to_markdown(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub table of cells formatted by the caller (None and NaN are empty); `|` inside a cell (as in
    `accuracy|domain=science`) is escaped, line breaks become spaces."""
    def cell(x: Any) -> str:
        x = plain(x)
        return "" if x is None else str(x).replace("|", r"\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(console, text: str) -> None:
    """Machine-readable text as it is: no markup, no highlighting, no wrapping at the console's width."""
    console.out(text.rstrip("\n"), highlight=False)
