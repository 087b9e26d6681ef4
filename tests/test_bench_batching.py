"""`dpolab bench batching` on the tiny model: both runs give the same dialogues; the report has its fields."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dpolab.banks as items_mod
from dpolab.bench.batching import bench_batching

FIXTURES = Path(__file__).parent / "fixtures" / "probes"


@pytest.fixture(autouse=True)
def fixture_banks(monkeypatch):
    monkeypatch.setattr(items_mod, "ASSETS", FIXTURES)


def test_bench_batching_runs_both_ways_identically(tiny_model_dir):
    """In float64 the batched and the one-at-a-time dialogues must be identical: no fp32 near-tie can excuse a
    difference. The JSON report carries the measured fields unchanged."""
    result = bench_batching(str(tiny_model_dir), n_items=2, techniques=("evidence", "expert"), turns=2, max_new_tokens=6,
                        batch_size=4, dtype="float64")
    assert result.dialogues == 4 and result.turns == 2 and result.batch_size == 4
    assert result.identical_transcripts == 4 and result.identical_stances == 4 and result.first_mismatch is None
    assert result.batched_s > 0 and result.sequential_s > 0
    report = result.to_json()
    for f in dataclasses.fields(result):
        assert report[f.name] == getattr(result, f.name)


def test_bench_batching_cli(tiny_model_dir, tmp_path):
    from dpolab.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "batching", "--model", str(tiny_model_dir), "--items", "2",
                                      "--techniques", "logical,expert", "--turns", "1", "--max-new-tokens", "4",
                                      "--stance", "letter", "--dtype", "float64", "--json", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["dialogues"] == 4 and written["reader"] == "letter" and written["turns"] == 1
    assert written["identical_transcripts"] == written["identical_stances"] == 4
    # what it prints is what it wrote
    assert f"speedup {written['speedup']:.2f}x; identical transcripts 4/4, identical stances 4/4" in result.output
    assert f"{written['batched_s']:8.1f} s" in result.output and f"{written['sequential_s']:8.1f} s" in result.output
