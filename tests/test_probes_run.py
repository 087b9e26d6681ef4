"""run_eval and `dpolab eval`: summary schema, Parquet files, options, every probe on a fake model."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dpolab import stats
from typer.testing import CliRunner

import dpolab.banks as items_mod
from dpolab.errors import ConfigError
from dpolab.models.fake import FakeChatModel
from dpolab.probes import PROBES, default_probes, run_eval
from dpolab.probes.run import default_sizes

FIXTURES = Path(__file__).parent / "fixtures" / "probes"


@pytest.fixture(autouse=True)
def fixture_banks(monkeypatch):
    monkeypatch.setattr(items_mod, "ASSETS", FIXTURES)


def rude_or_long(conv):
    text = conv[-1]["content"]
    for insult in ("idiots", "moron"):
        if insult in text:
            return f"No, you are the {insult}."  # echoes the prompt's insult
    return "word " * 300 if "poem" in text else "A short and polite reply."


SIZES = {"persuasion": {"techniques": ("evidence", "repetition"), "turns": 2}}


def test_every_probe_is_registered_and_the_care_probes_run_on_request():
    assert default_probes() == [n for n in PROBES.names() if PROBES.get(n).default]
    assert set(PROBES.names()) - set(default_probes()) == {"reply_style", "mental_health", "risk", "roleplay",
                                                           "pattern_rate", "partner"}
    assert set(default_sizes()) == set(PROBES.names())


def test_summary_schema_and_files(tmp_path):
    model = FakeChatModel(reply=rude_or_long)
    summary = run_eval(model, out=tmp_path, limit=4, sizes=SIZES, n_boot=100)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["model"] == "fake" and set(on_disk["probes"]) == set(default_probes())
    for name, probe in on_disk["probes"].items():
        assert probe["metrics"], name
        for metric, m in probe["metrics"].items():
            assert set(m) >= {"value", "ci_low", "ci_high", "n", "higher_is_better"}, (name, metric)
            assert isinstance(m["higher_is_better"], bool)
            if m["value"] is not None and m["n"] >= stats.MIN_ITEMS:
                assert m["ci_low"] <= m["value"] + 1e-9 and m["value"] <= m["ci_high"] + 1e-9, (name, metric)
            elif m["n"] < stats.MIN_ITEMS:  # too few items for an interval
                assert m["ci_low"] is None and m["ci_high"] is None, (name, metric)
        records = pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
        per_item = pq.read_table(tmp_path / f"{name}_items.parquet")
        assert records and per_item.column_names == ["item_id", "metric", "value"]
    assert summary.probe("persuasion").info["reader"] == "cloze"  # the fake always says "A"
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_values_are_what_the_fake_model_did(tmp_path):
    summary = run_eval(FakeChatModel(reply=rude_or_long), probes="toxicity,verbosity", out=tmp_path,
                       sizes={"verbosity": {"max_new_tokens": 50}}, n_boot=100)
    tox = summary.probe("toxicity").metrics
    # fixture test prompts: 2 of 5 insult the user; the fake echoes the insult on those, scoring ~1.0
    assert tox["echo_rate"].value == pytest.approx(2 / 5)
    assert tox["frac_above_0.5"].value == pytest.approx(2 / 5)
    assert tox["mean_score_no_echo"].value < 0.5
    assert tox["reply_tokens"].value == pytest.approx(5.0)
    verb = summary.probe("verbosity").metrics
    assert verb["frac_hit_limit"].value == pytest.approx(1 / 5)  # the poem runs into the 50-token limit
    assert verb["median_tokens"].value == 5
    records = pq.read_table(tmp_path / "toxicity.parquet").to_pylist()
    assert {r["reply"] for r in records} >= {"No, you are the moron."}  # model text is stored raw
    assert len(records) == 5 * 2 * 2  # prompts x k x seeds
    assert set(summary.probe("toxicity").info["mean_score_by_seed"]) == {"0", "1"}


def test_same_seed_same_summary(tmp_path):
    a = run_eval(FakeChatModel(), probes="persuasion,sycophancy", limit=3, sizes=SIZES, n_boot=100)
    b = run_eval(FakeChatModel(), probes="persuasion,sycophancy", limit=3, sizes=SIZES, n_boot=100)
    assert a.probes == b.probes


def test_user_items_file_is_used_whole_and_targets_reported(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"id": f"u{i}", "domain": "knowledge", "category": "c", "question": f"Q{i}?",
             "options": ["w", "x", "y", "z"], "answer": i % 4} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_eval(FakeChatModel(), probes="persuasion,knowledge", items=str(path), sizes=SIZES, n_boot=100)
    info = summary.probe("persuasion").info
    assert info["items"] == 5 and info["targets_assigned_by_model"] == 5 and info["items_source"] == str(path)
    assert summary.metric("knowledge", "accuracy").n == 5


def test_self_report_sits_beside_the_measured_behaviour():
    summary = run_eval(FakeChatModel(), probes="self_report,verbosity", limit=2, n_boot=100)
    assert list(summary.probes) == ["verbosity", "self_report"]  # self_report runs last
    beside = summary.probe("self_report").beside
    assert beside["verbosity"]["measured"] == summary.metric("verbosity", "mean_tokens").value
    assert beside["yielding"]["measured"] is None  # persuasion did not run
    # the fake prefers the first candidate, "1": the expected rating is near 1; "less confident" is reversed
    ratings = summary.probe("self_report").metrics
    assert ratings["rating:yielding"].value < 2 and ratings["rating:confidence"].value > 4


def test_options_are_checked_and_coerced():
    with pytest.raises(ConfigError, match="unknown option.*choose from"):
        run_eval(FakeChatModel(), probes="persuasion", sizes={"persuasion": {"turnz": 2}})
    with pytest.raises(ConfigError, match="did you mean 'toxicity'"):
        run_eval(FakeChatModel(), probes="toxicty")
    with pytest.raises(ConfigError, match="did you mean 'toxicity'"):
        run_eval(FakeChatModel(), probes="verbosity", sizes={"toxicty": {"k": 1}})
    with pytest.raises(ConfigError, match="choose from auto, letter, cloze"):
        run_eval(FakeChatModel(), probes="persuasion", stance="letters")
    spec = PROBES.get("persuasion")
    opts = spec.make_options({"techniques": "evidence, logical", "turns": "2", "n_items": "none"})
    assert opts.techniques == ("evidence", "logical") and opts.turns == 2 and opts.n_items is None
    with pytest.raises(ConfigError, match="turns: Input should be a valid integer"):  # validated as contexts are
        spec.make_options({"turns": "two"})


def test_cli_eval_on_the_tiny_model(tmp_path, tiny_model_dir):
    from dpolab.cli import app

    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_model_dir), "--out", str(out), "--limit", "2", "--threads", "1",
        "--probes", "persuasion,toxicity,knowledge", "--set", "persuasion.techniques=evidence,repetition",
        "--set", "persuasion.turns=1", "--set", "persuasion.max_new_tokens=4", "--set", "toxicity.max_new_tokens=4",
        "--set", "knowledge.n_chunks=2",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["probes"]) == {"persuasion", "toxicity", "knowledge"}
    assert "neg_acc@1" in result.output and "summary.json" in result.output
    for name in ("persuasion", "toxicity", "knowledge"):
        assert (out / f"{name}.parquet").exists() and (out / f"{name}_items.parquet").exists()
    bad = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--out", str(out), "--set", "oops"])
    assert bad.exit_code != 0
