"""Inspect logs of an eval (dpolab.probes.inspect_log): every probe of a tiny eval written with inspect_ai's writer
and read back with its reader; samples, scores, transcripts, metadata and results match the eval folder."""
from __future__ import annotations

import json
import math
import sys

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

pytest.importorskip("inspect_ai")

from inspect_ai.log import list_eval_logs, read_eval_log  # noqa: E402

import dpolab  # noqa: E402
from dpolab.cli import app  # noqa: E402
from dpolab.errors import ConfigError, DataError  # noqa: E402
from dpolab.probes import PROBES, run_eval  # noqa: E402
from dpolab.probes import inspect_log  # noqa: E402
from dpolab.replycodes import Coded, ReplyCoder, rule_codes, sentences  # noqa: E402

TINY = {
    "persuasion": {"techniques": ["evidence", "repetition"], "turns": 2, "max_new_tokens": 6},
    "toxicity": {"k": 2, "seeds": [0], "max_new_tokens": 6},
    "verbosity": {"max_new_tokens": 6},
    "knowledge": {"n_chunks": 2},
    "reply_style": {"max_new_tokens": 6},
    "mental_health": {"max_new_tokens": 6},
    "roleplay": {"max_new_tokens": 6},
    "pattern_rate": {"max_new_tokens": 6, "n_references": 2},
}


class FirstRuleCoder:
    """Codes a sentence by its first rule, else "information": the sentence encoder is not loaded (slow)."""

    def code(self, replies):
        out = []
        for r in replies:
            ss = sentences(r)
            out.append(Coded(tuple(ss), tuple((rule_codes(s) or ["information"])[0] for s in ss),
                             tuple(tuple(rule_codes(s)) for s in ss)))
        return out

    def heldout(self):
        return {"n": 0}


@pytest.fixture(scope="module")
def eval_dir(tiny_model_dir, tmp_path_factory):
    """Every probe on the tiny random-weight model, two items each, and its Inspect logs in DIR/inspect."""
    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ReplyCoder, "shared", staticmethod(lambda: FirstRuleCoder()))
        run_eval(str(tiny_model_dir), probes=list(PROBES.names()), out=out, limit=2, sizes=TINY, n_boot=100)
    paths = inspect_log.write_inspect_log(out, out / "inspect")
    assert len(paths) == len(PROBES.names()) and all(p.suffix == ".eval" for p in paths)
    return out


def logs_by_task(log_dir):
    """Every log in the folder, as inspect lists them, by task."""
    logs = [read_eval_log(info) for info in list_eval_logs(str(log_dir))]
    return {log.eval.task: log for log in logs}


def canon(x) -> str:
    return json.dumps(x, sort_keys=True)  # NaN as NaN on both sides


def same(a, b) -> bool:
    a = math.nan if a is None else a
    b = math.nan if b is None else b
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_layouts_cover_every_probe():
    assert set(inspect_log.LAYOUTS) == set(PROBES.names())


@pytest.mark.parametrize("probe", PROBES.names())
def test_a_probe_round_trips_through_inspect(eval_dir, probe):
    log = logs_by_task(eval_dir / "inspect")[probe]
    summary = json.loads((eval_dir / "summary.json").read_text())
    records = pq.read_table(eval_dir / f"{probe}.parquet").to_pylist()
    per_item = pq.read_table(eval_dir / f"{probe}_items.parquet").to_pylist()

    # the eval spec: model, version, seed, sizes, dataset
    assert log.status == "success" and log.eval.model == summary["model"]
    assert log.eval.packages["dpolab"] == dpolab.__version__ and log.eval.metadata["seed"] == summary["seed"]
    assert log.eval.task_args == summary["sizes"][probe]
    assert log.eval.dataset.location.startswith("bank:test")

    # one sample per item id: the records' ids, then ids with per-item values only
    by_id: dict[str, list[dict]] = {}
    for r in records:
        by_id.setdefault(r["item_id"], []).append(r)
    values: dict[str, dict[str, float]] = {}
    for row in per_item:
        values.setdefault(row["item_id"], {})[row["metric"]] = row["value"]
    ids = list(dict.fromkeys([*by_id, *values]))
    samples = log.samples
    assert log.eval.dataset.sample_ids == ids and log.eval.dataset.samples == len(ids) == log.results.total_samples
    assert sorted(s.id for s in samples) == sorted(ids)  # the reader returns them in its own order

    for s in samples:
        # scores: the per-item values, exactly
        if s.id in values:
            got = s.scores[probe].value
            assert list(got) == list(values[s.id]) and all(same(got[k], v) for k, v in values[s.id].items()), s.id
        else:
            assert not s.scores
        mine = by_id.get(s.id, [])
        if not mine:  # a value paired over items: no conversation
            assert not s.messages and "paired" in s.input
            continue
        # metadata: the records, every column but the transcript (which is the messages)
        back = [{**{k: v for k, v in s.metadata.items() if k != "records"}, **r}
                for r in s.metadata.get("records", [{}])]
        assert canon(back) == canon([{k: v for k, v in r.items() if k != "transcript"} for r in mine]), s.id
        # messages: the first record's conversation; its last assistant message is the stored reply
        first = mine[0]
        assistant = [m.text for m in s.messages if m.role == "assistant"]
        if "transcript" in first:
            assert [(m.role, m.text) for m in s.messages] == [(m["role"], m["content"]) for m in first["transcript"]]
            assert assistant[-1] == [m["content"] for m in first["transcript"] if m["role"] == "assistant"][-1]
            assert len(assistant) == summary["sizes"]["persuasion"]["turns"] + 1  # every turn
            assert s.choices == first["options"]
        elif first.get("reply") is not None:
            assert assistant == [first["reply"]] and s.output.completion == first["reply"]
        else:  # scored, not generated: the prompt, no reply
            assert not assistant and s.messages[-1].role == "user" and s.messages[-1].text
        before_reply = next((j for j, m in enumerate(s.messages) if m.role == "assistant"), len(s.messages))
        assert [(m.role, m.text) for m in s.input] == [(m.role, m.text) for m in s.messages[:before_reply]]
        # events: every generated reply of every record of the item, in order
        generated = [m["content"] for r in mine for m in (r.get("transcript") or []) if m["role"] == "assistant"]
        generated += [r["reply"] for r in mine if "transcript" not in r and r.get("reply") is not None
                      and r.get("kind") != "reference"]
        assert [e.output.completion for e in s.events if e.event == "model"] == generated, s.id

    # results: summary.json's metrics, with their CIs and n
    scores = {sc.name: sc for sc in log.results.scores}
    assert list(scores) == list(summary["probes"][probe]["metrics"])
    for name, m in summary["probes"][probe]["metrics"].items():
        sc = scores[name]
        assert sc.scorer == probe and sc.scored_samples == m["n"]
        assert same(sc.metrics[m["aggregate"]].value, m["value"])
        assert same(sc.metrics["ci_low"].value, m["ci_low"]) and same(sc.metrics["ci_high"].value, m["ci_high"])
        assert sc.metadata["higher_is_better"] == m["higher_is_better"]
    assert log.results.metadata["info"] == summary["probes"][probe]["info"]
    heads = [h.metric for h in PROBES.get(probe).headlines]
    if heads:
        assert log.results.headline.score == heads[0]


def test_writing_again_replaces_the_logs(eval_dir, tmp_path):
    first = inspect_log.write_inspect_log(eval_dir, tmp_path, probes=["verbosity"])
    again = inspect_log.write_inspect_log(eval_dir, tmp_path, probes=["verbosity"], model="a cell")
    assert first == again and list(tmp_path.iterdir()) == first
    assert read_eval_log(str(again[0])).eval.model == "a cell"


def test_an_unknown_layout_or_probe_is_an_error_naming_it(eval_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="has no probe 'toxicty'"):
        inspect_log.write_inspect_log(eval_dir, tmp_path, probes=["toxicty"])
    monkeypatch.delitem(inspect_log.LAYOUTS, "risk")
    with pytest.raises(ConfigError, match="no Inspect log layout for probe 'risk'"):
        inspect_log.write_inspect_log(eval_dir, tmp_path)
    monkeypatch.setitem(inspect_log.LAYOUTS, "verbosity", inspect_log.Layout(("answer",), lambda r: []))
    with pytest.raises(DataError, match="verbosity.parquet lacks column"):
        inspect_log.write_inspect_log(eval_dir, tmp_path, probes=["verbosity"])


def test_missing_inspect_says_how_to_install(eval_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "inspect_ai", None)
    with pytest.raises(ConfigError, match=r"pip install inspect-ai==0\.3\.285"):
        inspect_log.write_inspect_log(eval_dir, tmp_path)


def test_cli_eval_writes_inspect_logs_and_converts_a_finished_eval(tiny_model_dir, eval_dir, tmp_path):
    runner = CliRunner()
    out, logs = tmp_path / "eval", tmp_path / "logs"
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--out", str(out), "--probes",
                                 "verbosity,sycophancy", "--limit", "2", "--set", "verbosity.max_new_tokens=4",
                                 "--inspect-log", str(logs)])
    assert result.exit_code == 0, result.output
    found = logs_by_task(logs)
    assert set(found) == {"verbosity", "sycophancy"}
    assert len(found["verbosity"].samples) == 2 and found["verbosity"].samples[0].output.completion is not None

    converted = tmp_path / "converted"
    result = runner.invoke(app, ["inspect-log", str(eval_dir), "--out", str(converted)])
    assert result.exit_code == 0, result.output
    assert "inspect view --log-dir" in result.output
    assert set(logs_by_task(converted)) == set(PROBES.names())
