"""dpolab.data: the row schema, every reader, and validation that lists every bad row."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dpolab.data import PreferencePair, Problem, read_pairs, validate, write_pairs
from dpolab.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
GOOD_ROW = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written as the line itself)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def unsourced(pairs: list[PreferencePair]) -> list[PreferencePair]:
    return [dataclasses.replace(p, source="") for p in pairs]


# One case per kind of bad row: (the row, as a dict or a raw line; field; reason). The file holds a good row on
# line 1 and this row on line 2, so each case also checks the line number.
BAD_ROWS = {
    "missing field": ({"prompt": "Hi", "rejected": "Go away."}, "chosen", "missing"),
    "empty field": ({**GOOD_ROW, "prompt": ""}, "prompt", "empty"),
    "null field": ({**GOOD_ROW, "rejected": None}, "rejected", "missing"),
    "wrong type": ({**GOOD_ROW, "chosen": 3}, "chosen", "must be a string or a list of messages, got int (3)"),
    "message not a dict": ({**GOOD_ROW, "chosen": ["Hello!"]}, "chosen[0]",
                           "must be a message object with 'role' and 'content', got str"),
    "content not a string": ({**GOOD_ROW, "chosen": [{"role": "assistant", "content": 5}]}, "chosen[0].content",
                             "must be a string, got int"),
    "message without role": ({**GOOD_ROW, "prompt": [{"content": "Hi"}]}, "prompt[0].role", "missing"),
    "empty message": ({**GOOD_ROW, "prompt": [{"role": "user", "content": " "}]}, "prompt[0].content", "empty"),
    "unknown role": ({**GOOD_ROW, "prompt": [{"role": "robot", "content": "Hi"}]}, "prompt[0].role",
                     "unknown role 'robot'; allowed: system, user, assistant"),
    "tool role": ({**GOOD_ROW, "prompt": [{"role": "tool", "content": "42"}]}, "prompt[0].role",
                  "unknown role 'tool'; allowed: system, user, assistant"),
    "final turn not assistant": ({**GOOD_ROW, "chosen": [{"role": "user", "content": "Hello!"}]}, "chosen",
                                 "the final message must be from the assistant, got 'user'"),
    "two user turns": ({**GOOD_ROW, "prompt": [USER, USER]}, "prompt",
                       "roles must be an optional system message, then user and assistant taking turns from user, "
                       "so the prompt ends with a user message; got user, user, assistant"),
    "system not first": ({**GOOD_ROW, "prompt": [USER, {"role": "system", "content": "Be nice."}, USER]}, "prompt",
                         "roles must be an optional system message, then user and assistant taking turns from user, "
                         "so the prompt ends with a user message; got user, system, user, assistant"),
    "prompt ends with assistant": ({**GOOD_ROW, "prompt": [USER, ASSISTANT]}, "prompt",
                                   "roles must be an optional system message, then user and assistant taking turns "
                                   "from user, so the prompt ends with a user message; got user, assistant, assistant"),
    "implicit prompts differ": ({"chosen": [USER, ASSISTANT], "rejected": [{"role": "user", "content": "Yo"}, ASSISTANT | {"content": "No."}]},
                                "rejected", "chosen and rejected must share every message before the final assistant turn; "
                                "they differ at message 0"),
    "no prompt at all": ({"chosen": "Hello!", "rejected": "Go away."}, "prompt",
                         "missing: give a prompt, or chosen/rejected conversations that start with it"),
    "chosen identical to rejected": ({**GOOD_ROW, "rejected": "Hello!"}, "chosen", "chosen is identical to rejected"),
    "nan score (string)": ({**GOOD_ROW, "score_chosen": "nan", "score_rejected": 0}, "score_chosen",
                           "must be a finite number, got 'nan'"),
    "nan score (JSON literal)": ('{"prompt": "Hi", "chosen": "A", "rejected": "B", "score_chosen": 1, "score_rejected": NaN}',
                                 "score_rejected", "must be a finite number, got nan"),
    "infinite score": ({**GOOD_ROW, "score_chosen": 1, "score_rejected": "-inf"}, "score_rejected",
                       "must be a finite number, got '-inf'"),
    "score not a number": ({**GOOD_ROW, "score_chosen": "high", "score_rejected": 0}, "score_chosen",
                           "must be a number, got 'high'"),
    "score on one side": ({**GOOD_ROW, "score_chosen": 1.0}, "score_rejected",
                          "missing while score_chosen is given; give both scores or neither"),
    "negative weight": ({**GOOD_ROW, "weight": -1}, "weight", "must be >= 0, got -1.0"),
    "id of the wrong type": ({**GOOD_ROW, "id": [1]}, "id", "must be a string or an integer, got list"),
    "meta not an object": ({**GOOD_ROW, "meta": 3}, "meta", "must be an object, got int"),
    "extra column clashes with meta": ({**GOOD_ROW, "source": "web", "meta": {"source": "x"}}, "source",
                                       "also a key of 'meta'; rename the column or the meta key"),
    "invalid JSON": ('{"prompt": "Hi", "chosen": ', None, "invalid JSON: Expecting value (column 28)"),
    "line not an object": ("[1, 2]", None, "each line must be a JSON object, got a list"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_each_kind_of_bad_row_is_reported_with_file_line_field_and_reason(tmp_path, case):
    row, field, reason = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROW, row])
    problems = validate(path)
    assert problems == [Problem(file=str(path), line=2, field=field, reason=reason)]
    where = f"{path}:2: " + (f"field '{field}': " if field else "")
    assert str(problems[0]) == where + reason


def test_duplicate_id_points_at_the_first_use(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{**GOOD_ROW, "id": "a"}, {**GOOD_ROW, "id": "b"}, {**GOOD_ROW, "id": "a"}])
    assert [str(p) for p in validate(path)] == [f"{path}:3: field 'id': duplicate id 'a' (first used at {path}:1)"]


def test_invalid_utf8_spoils_only_its_own_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps(GOOD_ROW).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "\xff\xfe"}\n' + good.replace(b"Hi", b"Hey") + b"\n")
    result = read_pairs(path, skip_invalid=True)
    assert [str(p) for p in result.problems] == [f"{path}:2: invalid UTF-8 (byte 13 of the line)"]
    assert [p.prompt[0]["content"] for p in result.pairs] == ["Hi", "Hey"]
    assert (result.n_rows, result.n_skipped) == (3, 1)


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]"),
                                        ("empty.csv", "prompt,chosen,rejected\n")])
def test_empty_file_is_one_problem_without_a_line(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    problems = validate(path)
    assert problems == [Problem(file=str(path), line=None, field=None, reason="file is empty")]
    assert str(problems[0]) == f"{path}: file is empty"
    with pytest.raises(DataError, match="no rows could be read"):
        read_pairs(path, skip_invalid=True)


def test_unsupported_or_missing_file_is_a_clear_data_error(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'; supported: \.jsonl, \.ndjson, \.json, \.parquet, \.csv"):
        validate(path)
    with pytest.raises(DataError, match="no such file"):
        validate(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read as Parquet"):
        validate(broken)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        validate(tmp_path / "folder")


def test_validate_lists_every_bad_row_not_just_the_first():
    path = FIXTURES / "bad.jsonl"
    assert [(p.line, p.field) for p in validate(path)] == [
        (2, "chosen"), (3, "chosen"), (5, None), (6, "score_chosen"), (7, "id"), (8, "prompt[0].role")]


def test_read_pairs_raises_listing_every_problem_capped_at_50(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROW] + [{**GOOD_ROW, "rejected": "Hello!"}] * 60)
    with pytest.raises(DataError) as info:
        read_pairs(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 60 of 61 rows are invalid (fix them, or drop them with --skip-invalid):\n")
    assert f"  {path}:2: field 'chosen': chosen is identical to rejected" in message
    assert message.count("chosen is identical to rejected") == 50
    assert message.endswith("  ... and 10 more")


def test_skip_invalid_drops_bad_rows_and_counts_them():
    result = read_pairs(FIXTURES / "bad.jsonl", skip_invalid=True)
    assert [p.id for p in result.pairs] == ["ok"]
    assert (result.n_rows, result.n_skipped, len(result.problems)) == (7, 6, 6)


def test_skip_invalid_still_raises_when_no_row_is_good(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{**GOOD_ROW, "rejected": "Hello!"}])
    with pytest.raises(DataError, match="all 1 rows are invalid"):
        read_pairs(path, skip_invalid=True)


def test_standard_explicit_and_implicit_formats_give_the_same_pair():
    pairs = read_pairs(FIXTURES / "good.jsonl").pairs
    bare = [dataclasses.replace(p, id="", source="", score_chosen=None, score_rejected=None, weight=1.0, meta={}) for p in pairs]
    expected = PreferencePair(id="", prompt=[{"role": "user", "content": "What is 2+2?"}], chosen="4", rejected="5")
    assert bare == [expected] * 3
    assert (pairs[1].score_chosen, pairs[1].score_rejected) == (0.9, 0.1)
    assert (pairs[2].weight, pairs[2].meta) == (0.5, {"topic": "maths"})
    assert [p.source for p in pairs] == [f"{FIXTURES / 'good.jsonl'}:{n}" for n in (1, 2, 3)]


def test_multi_turn_conversations_read_the_same_in_every_layout():
    pairs = read_pairs(FIXTURES / "multiturn.jsonl").pairs
    expected_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                       {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(expected_prompt, "Red.", "Blue.")] * 3


def test_default_ids_extra_columns_and_integer_ids(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{**GOOD_ROW, "source": "web"}, "", {**GOOD_ROW, "id": 7, "meta": '{"k": 1}'}, GOOD_ROW])
    pairs = read_pairs(path).pairs
    assert [p.id for p in pairs] == ["row-0", "7", "row-2"]  # blank lines are not rows
    assert [p.meta for p in pairs] == [{"source": "web"}, {"k": 1}, {}]
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:3", f"{path}:4"]


# --- readers -------------------------------------------------------------------------------------------------

PAIRS = [
    PreferencePair(id="a", prompt=[{"role": "user", "content": "Say \"hi\", then a comma, please."}], chosen="hi,\nthere", rejected="no"),
    PreferencePair(id="b", prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"},
                                   {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
                   chosen="Red.", rejected="[not a list]", score_chosen=1.5, score_rejected=-0.25, weight=0.5,
                   meta={"topic": "colours", "tags": ["x", "y"], "n": 3}),
    PreferencePair(id="c", prompt=[{"role": "user", "content": "Ünïcode ✓"}], chosen="日本", rejected="中文", weight=2.0),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_format_round_trips(tmp_path, suffix):
    path = write_pairs(PAIRS, tmp_path / f"pairs{suffix}")
    result = read_pairs(path)
    assert unsourced(result.pairs) == PAIRS
    assert (result.n_rows, result.n_skipped) == (3, 0)


def test_saved_dataset_folder_round_trips(tmp_path):
    import datasets

    from dpolab.data.formats import pair_record

    records = [{**pair_record(p), "meta": json.dumps(p.meta)} for p in PAIRS]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records), "test": datasets.Dataset.from_list(records[:1])}).save_to_disk(str(tmp_path / "dict"))
    for folder in ("plain", "dict"):
        result = read_pairs(tmp_path / folder)
        assert unsourced(result.pairs) == PAIRS
        assert result.pairs[1].source == f"{tmp_path / folder} row 1"


def test_json_accepts_a_data_or_train_list_and_json_lines(tmp_path):
    rows = [GOOD_ROW, {**GOOD_ROW, "prompt": "Hey"}]
    for key in ("data", "train"):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({key: rows}))
        assert [p.prompt[0]["content"] for p in read_pairs(path).pairs] == ["Hi", "Hey"]
    lines = write_jsonl(tmp_path / "lines.json", rows)
    assert [p.source for p in read_pairs(lines).pairs] == [f"{lines}:1", f"{lines}:2"]
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"data": rows, "train": rows}))
    assert [p.reason for p in validate(both)] == [
        "a .json file must hold a list of rows, or an object with exactly one of 'data' or 'train' holding that list; "
        "got an object with keys data, train"]


def test_json_rows_are_located_by_index_and_bad_json_by_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD_ROW, {**GOOD_ROW, "chosen": 1}]))
    assert [str(p) for p in validate(path)] == [f"{path} row 1: field 'chosen': must be a string or a list of messages, got int (1)"]
    path.write_text('[\n{"prompt": "Hi"},\n{"prompt": }\n]')
    assert [str(p) for p in validate(path)] == [f"{path}:3: invalid JSON: Expecting value (column 12)"]


def test_parquet_bad_row_is_located_by_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD_ROW, {**GOOD_ROW, "rejected": "Hello!"}]), path)
    assert [str(p) for p in validate(path)] == [f"{path} row 1: field 'chosen': chosen is identical to rejected"]


def test_csv_lines_count_multi_line_cells_and_extra_cells_are_reported(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,chosen,rejected\nHi,"Hello,\nthere",No\nHi,Same,Same\nHi,A,B,extra\n[not json,A,B\n'
                    '"[{""role"": ""user""",A,B\n')
    assert [str(p) for p in validate(path)] == [
        f"{path}:4: field 'chosen': chosen is identical to rejected",
        f"{path}:5: row has 1 more cell(s) than the header",
        f"{path}:7: field 'prompt': looks like a JSON list of messages but is not valid JSON: "
        "Expecting ',' delimiter (column 17)",
    ]
    pairs = read_pairs(path, skip_invalid=True).pairs
    assert [(p.prompt[0]["content"], p.chosen) for p in pairs] == [("Hi", "Hello,\nthere"), ("[not json", "A")]


def test_csv_invalid_utf8_is_reported_at_its_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"prompt,chosen,rejected\nHi,A,B\nHi,\xff,B\nHey,A,B\n")
    result = read_pairs(path, skip_invalid=True)
    assert [str(p) for p in result.problems] == [f"{path}:3: invalid UTF-8 (byte 4 of the line)"]
    assert len(result.pairs) == 2
