"""A few steps on the embedded SmolLM2-135M-Instruct: training on persuasion-style pairs raises the reward margin."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import dpolab

EXAMPLES = Path(dpolab.__file__).parent / "assets" / "examples" / "persuasion_pairs.jsonl"


@pytest.mark.real_model
def test_real_model_margins_rise(real_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(EXAMPLES.read_text().splitlines(keepends=True)[:8]))
    result = dpolab.train(model=str(real_model_dir), data=str(data), out=str(tmp_path / "out"), loss="dpo", beta=0.1,
                          lr=2e-5, batch_size=4, max_steps=4, progress=False, save_model=False)
    margins = [m["rewards/margins"] for m in result.metrics]
    assert result.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert margins[-1] > 0.05, margins
    assert result.metrics[-1]["rewards/accuracies"] > 0.5
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4
