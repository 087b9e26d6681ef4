"""`dpolab bench eval` on the tiny model: both runs give the same dialogues; the report has its fields."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dpolab.probes.items as items_mod
from dpolab.probes.bench import bench_eval

FIXTURES = Path(__file__).parent / "fixtures" / "probes"


@pytest.fixture(autouse=True)
def fixture_banks(monkeypatch):
    monkeypatch.setattr(items_mod, "ASSETS", FIXTURES)
    torch.set_num_threads(1)


def test_bench_eval_runs_both_ways_identically(tiny_model_dir):
    result = bench_eval(str(tiny_model_dir), n_items=2, techniques=("evidence", "expert"), turns=2, max_new_tokens=6,
                        batch_size=4)
    assert result.dialogues == 4
    assert result.identical_transcripts == 4 and result.identical_stances == 4 and result.first_mismatch is None
    report = result.to_json()
    assert report["speedup"] == pytest.approx(result.sequential_s / result.batched_s)
    assert report["batched_dialogues_per_s"] > 0


def test_bench_eval_cli(tiny_model_dir, tmp_path):
    from dpolab.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "eval", "--model", str(tiny_model_dir), "--items", "1",
                                      "--techniques", "logical", "--turns", "1", "--max-new-tokens", "4",
                                      "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "speedup" in result.output and "identical transcripts 1/1" in result.output
    assert out.exists()
