"""Bank schemas: the shipped banks load and meet the issue's sizes, splits are disjoint, bad rows fail clearly."""
from __future__ import annotations

import json
from collections import Counter

import pytest

import dpolab.banks as items_mod
from dpolab.errors import DataError
from dpolab.banks import (DIRECTIONS, TECHNIQUES, Appeal, Instruction, Item, Prompt, SelfReportQuestion,
                                 asset, bank_items, bank_split, read_appeals, read_items, read_jsonl, read_split, spread)
from dpolab.probes.self_report import BESIDE


def test_shipped_items_meet_the_sizes():
    knowledge = read_jsonl(asset("knowledge.jsonl"), Item)
    safety = read_jsonl(asset("safety.jsonl"), Item)
    assert len(knowledge) >= 300 and len({it.category for it in knowledge}) >= 8
    assert len(safety) >= 100
    assert {it.domain for it in knowledge} == {"knowledge"} and {it.domain for it in safety} == {"safety"}
    assert all(it.target is not None for it in knowledge + safety)
    assert len({it.id for it in knowledge + safety}) == len(knowledge) + len(safety)


def test_split_is_disjoint_and_covers_the_bank():
    split = read_split()
    train, test = set(split["train"]), set(split["test"])
    assert not train & test
    ids = {it.id for it in read_jsonl(asset("knowledge.jsonl"), Item) + read_jsonl(asset("safety.jsonl"), Item)}
    assert train | test == ids
    assert {it.id for it in bank_items("test")} == test
    assert {it.domain for it in bank_items("test")} == {"knowledge", "safety"}


def test_other_banks_load():
    appeals = read_appeals()
    have = Counter((a.technique, a.direction) for a in appeals)
    assert set(have) == {(t, d) for t in TECHNIQUES for d in DIRECTIONS}
    for (t, _), n in have.items():
        assert n >= (1 if t == "repetition" else 3)  # repetition is the bare claim: no appeal text
    assert all(set(_slots(a.template)) <= {"claim", "question"} for a in appeals)
    prompts = read_jsonl(asset("toxicity_prompts.jsonl"), Prompt)
    assert len(bank_split(prompts, "test")) >= 100
    assert not {p.id for p in bank_split(prompts, "train")} & {p.id for p in bank_split(prompts, "test")}
    instructions = read_jsonl(asset("instructions.jsonl"), Instruction)
    assert len(bank_split(instructions, "test")) >= 40
    questions = read_jsonl(asset("self_report.jsonl"), SelfReportQuestion)
    assert {q.behaviour for q in questions} == set(BESIDE)
    assert asset("heldout_text.txt").read_text().split()


def _slots(template: str) -> list[str]:
    import string

    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _write(tmp_path, rows) -> str:
    path = tmp_path / "items.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"id": "q1", "domain": "knowledge", "category": "c", "question": "Q?", "options": ["a", "b", "c"],
        "answer": 0, "target": 1, "source": "test"}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "answer": 3}, "answer 3 is not an option index"),
    ({**GOOD, "target": 0}, "target must be a wrong option"),
    ({**GOOD, "options": ["only one"]}, "options"),
    ({**GOOD, "domain": "math"}, "domain"),
    ({k: v for k, v in GOOD.items() if k != "question"}, "question"),
])
def test_bad_items_fail_with_line_and_field(tmp_path, bad, message):
    with pytest.raises(DataError, match=message) as err:
        read_items(_write(tmp_path, [GOOD, bad]))
    assert ":2:" in str(err.value)


def test_duplicate_ids_and_bad_json_fail(tmp_path):
    with pytest.raises(DataError, match="duplicate id 'q1'"):
        read_items(_write(tmp_path, [GOOD, GOOD]))
    with pytest.raises(DataError, match="not valid JSON"):
        read_items(_write(tmp_path, [GOOD, "{nope"]))
    with pytest.raises(DataError, match="does not exist"):
        read_items(tmp_path / "missing.jsonl")


def test_user_items_need_no_target_or_source_and_keep_extra_fields_out(tmp_path):
    row = {k: v for k, v in GOOD.items() if k not in ("target", "source")} | {"src_id": 17}
    [item] = read_items(_write(tmp_path, [row]))
    assert item.target is None and item.source == ""


def test_appeals_file_must_cover_every_technique(tmp_path):
    path = tmp_path / "appeals.jsonl"
    path.write_text(json.dumps({"id": "x", "technique": "evidence", "direction": "neg", "template": "{claim}"}) + "\n")
    with pytest.raises(DataError, match="no template for evidence/pos"):
        read_appeals(path)
    assert Appeal(id="y", technique="logical", direction="pos", template="").template == ""


def test_spread_covers_groups_and_is_stable():
    items = bank_items("test")
    a = spread(items, 20, seed=0)
    assert a == spread(items, 20, seed=0)
    assert len({(it.domain, it.category) for it in a}) == min(20, len({(it.domain, it.category) for it in items}))
    assert {it.domain for it in spread(items, 4, seed=1)} == {"knowledge", "safety"} or len(items) < 4
    assert spread(items, None, seed=0) == spread(items, 10**6, seed=0) and len(spread(items, None, seed=0)) == len(items)


def test_missing_bank_names_the_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(items_mod, "ASSETS", tmp_path)
    with pytest.raises(DataError, match="missing"):
        asset("knowledge.jsonl")
