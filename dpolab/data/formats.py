"""File formats: one reader (file -> raw rows with their locations) and one writer per supported file type.

Readers never stop at a bad row: a line that is not valid UTF-8 or JSON becomes a row with a Problem, and the
rest of the file is still read. Only a file that cannot be opened at all raises DataError.

- `.jsonl` / `.ndjson`: one JSON object per line; blank lines are skipped. Locations are 1-based lines.
- `.json`: a list of row objects, or an object holding that list under "data" or "train" (exactly one of them).
  A `.json` file that is really JSON Lines (several documents) is read as JSON Lines. Locations are 0-based rows.
- `.parquet`: read with pyarrow. Locations are 0-based rows.
- `.csv`: a header row, then one row per record (quoted cells may span lines). Every cell is text: an empty cell
  is an absent field, a cell holding a JSON list is a list of messages, `meta` is a JSON string. Locations are
  the 1-based line where the record starts.
- a folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict: its "train" split, or its only split).
  Locations are 0-based rows.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dpolab.data.schema import Location, PreferencePair, Problem
from dpolab.errors import DataError

SUPPORTED = ".jsonl, .ndjson, .json, .parquet, .csv, or a folder saved with datasets' save_to_disk"


@dataclass
class RawRow:
    record: dict | None  # None when the row could not be read (its problems say why)
    index: int  # 0-based position among the file's rows
    where: Location
    problems: list[Problem] = field(default_factory=list)


@dataclass
class RawFile:
    rows: list[RawRow]
    problems: list[Problem]  # about the whole file (empty, not a list, ...)
    text_cells: bool = False  # CSV: every cell is a string


def read_raw(path: str | Path) -> RawFile:
    """Read every row of a preference-data file or saved-dataset folder, without interpreting the fields."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise DataError(f"{name}: no such file or folder")
    if path.is_dir():
        raw = _read_saved_dataset(path, name)
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{name}: unsupported file type {path.suffix or '(no extension)'!r}; supported: {SUPPORTED}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{name}: cannot read: {exc.strerror or exc}") from None
        raw = reader(data, name)
    if not raw.rows and not raw.problems:
        raw.problems.append(Problem(file=name, line=None, field=None, reason="file is empty"))
    return raw


def _read_jsonl(data: bytes, name: str) -> RawFile:
    rows: list[RawRow] = []
    # Decoding line by line keeps one bad byte from losing the whole file.
    for number, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not line.strip():
            continue
        where = Location(name, number, "line")
        row = RawRow(record=None, index=len(rows), where=where)
        rows.append(row)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            row.problems.append(where.problem(None, f"invalid UTF-8 (byte {exc.start + 1} of the line)"))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            row.problems.append(where.problem(None, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            row.problems.append(where.problem(None, f"each line must be a JSON object, got {_json_type(record)}"))
            continue
        row.record = record
    return RawFile(rows=rows, problems=[])


def _read_json(data: bytes, name: str) -> RawFile:
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return RawFile(rows=[], problems=[Problem(name, line, None, "invalid UTF-8")])
    if not text.strip():
        return RawFile(rows=[], problems=[])
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several documents: JSON Lines under a .json name
            return _read_jsonl(data, name)
        return RawFile(rows=[], problems=[Problem(name, exc.lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})")])
    if isinstance(document, dict):
        keys = [k for k in ("data", "train") if isinstance(document.get(k), list)]
        if len(keys) != 1:
            shown = ", ".join(list(document)[:8]) or "none"
            return RawFile(rows=[], problems=[Problem(name, None, None, "a .json file must hold a list of rows, or an object "
                                                      f"with exactly one of 'data' or 'train' holding that list; got an object with keys {shown}")])
        document = document[keys[0]]
    if not isinstance(document, list):
        return RawFile(rows=[], problems=[Problem(name, None, None, f"a .json file must hold a list of rows, got {_json_type(document)}")])
    return _rows_from_records(document, name)


def _read_parquet(data: bytes, name: str) -> RawFile:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name}: cannot read as Parquet: {exc}") from None
    return _rows_from_records(table.to_pylist(), name)


def _read_csv(data: bytes, name: str) -> RawFile:
    lines, bad_lines = [], {}
    for number, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(keepends=True), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad_lines[number] = exc.start + 1
            lines.append(line.decode("utf-8", errors="replace"))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        while header == []:  # leading blank lines
            header = next(reader, None)
        if header is None:
            return RawFile(rows=[], problems=[], text_cells=True)
        duplicates = sorted({h for h in header if header.count(h) > 1})
        if duplicates:
            return RawFile(rows=[], problems=[Problem(name, reader.line_num, None, f"duplicate column(s) in the header: {', '.join(duplicates)}")],
                           text_cells=True)
        rows: list[RawRow] = []
        first_line = reader.line_num + 1
        for cells in reader:
            start, first_line = first_line, reader.line_num + 1
            if not cells:
                continue
            where = Location(name, start, "line")
            row = RawRow(record=None, index=len(rows), where=where)
            rows.append(row)
            bad = [n for n in range(start, reader.line_num + 1) if n in bad_lines]
            if bad:
                row.problems.extend(Location(name, n).problem(None, f"invalid UTF-8 (byte {bad_lines[n]} of the line)") for n in bad)
                continue
            record = dict(zip(header, cells))
            if len(cells) > len(header):
                record[None] = cells[len(header):]  # parse_row reports it
            row.record = record
    except csv.Error as exc:
        return RawFile(rows=[], problems=[Problem(name, reader.line_num, None, f"invalid CSV: {exc}")], text_cells=True)
    return RawFile(rows=rows, problems=[], text_cells=True)


def _read_saved_dataset(path: Path, name: str) -> RawFile:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{name}: a folder must be a dataset saved with datasets' save_to_disk ({exc}); "
                        f"supported: {SUPPORTED}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise DataError(f"{name}: a saved DatasetDict must have a 'train' split or only one split; it has {', '.join(splits)}")
    return _rows_from_records(loaded.to_list(), name)


def _rows_from_records(records: list, name: str) -> RawFile:
    rows = []
    for index, record in enumerate(records):
        where = Location(name, index, "row")
        if isinstance(record, dict):
            rows.append(RawRow(record=record, index=index, where=where))
        else:
            rows.append(RawRow(record=None, index=index, where=where,
                               problems=[where.problem(None, f"each row must be an object, got {_json_type(record)}")]))
    return RawFile(rows=rows, problems=[])


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


READERS: dict[str, Callable[[bytes, str], RawFile]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


# --- writing -----------------------------------------------------------------------------------------------

def pair_record(pair: PreferencePair) -> dict:
    """A pair as a row in TRL's explicit-prompt conversational format (plus dpolab's optional fields)."""
    return {
        "id": pair.id,
        "prompt": [dict(m) for m in pair.prompt],
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
        "score_chosen": pair.score_chosen,
        "score_rejected": pair.score_rejected,
        "weight": pair.weight,
        "meta": pair.meta,
    }


def write_pairs(pairs: list[PreferencePair], path: str | Path) -> Path:
    """Write pairs as .jsonl, .json, .parquet or .csv (by the suffix); read_pairs reads them back equal.

    Parquet and CSV store `meta` as a JSON string (a free-form object has no fixed column type);
    CSV also stores message lists as JSON strings.
    """
    path = Path(path)
    records = [pair_record(p) for p in pairs]
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".jsonl", ".ndjson"):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{**r, "meta": json.dumps(r["meta"], ensure_ascii=False)} for r in records]), path)
    elif suffix == ".csv":
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=list(pair_record(PreferencePair("", [], "", ""))))
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else ("" if v is None else v)
                             for k, v in r.items()})
        path.write_text(out.getvalue(), encoding="utf-8", newline="")
    else:
        raise DataError(f"{path}: cannot write {suffix or '(no extension)'!r}; choose .jsonl, .json, .parquet or .csv")
    return path
