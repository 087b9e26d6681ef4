"""Data-parallel training: 2 processes and 1 process with the same global batch end with the same weights.

Both run in float64 (dpolab computes the norms in float64 too), where the two differ only by the order of the
gradient all-reduce's sums: equal to float64 rounding on any CPU (tests/exact.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from tests.exact import assert_same
from tests.test_train import persuasion_rows


def _launch(n: int, tiny_model_dir, data, out, env):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--multi_gpu"] if n > 1 else ["--cpu"]  # on a machine with no GPU, --multi_gpu runs torchrun with gloo
    cmd += ["-m", "dpolab", "train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
            "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--set", "progress=false", "--set", "dtype=float64"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_two_processes_match_one(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in persuasion_rows()))
    # CPU processes with gloo even where a GPU exists: the comparison is between process counts, not devices
    env = {**os.environ, "DPOLAB_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    log2 = _launch(2, tiny_model_dir, data, tmp_path / "two", env)
    assert "2 process(es)" in log2
    _launch(1, tiny_model_dir, data, tmp_path / "one", env)
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_same(a[k], b[k])
