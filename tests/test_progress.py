"""Progress in a log: `dpolab run` with stdout not a terminal prints one plain line per phase and cell, with the time
so far and what is left, and no bars (its own or the libraries' weight-loading ones)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import yaml

from tests.test_run import TINY_SIZES


def test_run_into_a_log_prints_plain_lines_per_phase_and_cell(tiny_model_dir, tmp_path):
    spec = {"model": str(tiny_model_dir), "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 1, "save_every": 1000},
            "methods": {"dpo": {"loss": "dpo"}, "ipo": {"loss": "ipo"}},
            "contexts": {"length-biased-judge": {"methods": ["dpo", "ipo"],
                                                 "options": {"n_instructions": 6, "max_new_tokens": 400}}},
            "probes": {"names": ["verbosity", "toxicity"], "sizes": TINY_SIZES}, "n_boot": 200}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "DPOLAB_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "run.log", "w") as log, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "dpolab", "run", str(path), "--out", str(tmp_path / "run")],
                              stdout=log, stderr=err, env=env, timeout=600)
    out, err = (tmp_path / "run.log").read_text(), (tmp_path / "err.log").read_text()
    assert proc.returncode == 0, err[-3000:]
    for text in (out, err):
        assert "\x1b[" not in text and "\r" not in text  # no colour codes, no redrawn bars
        assert "Loading weights" not in text and "Writing model shards" not in text
    lines = [x for x in out.splitlines() if x.startswith("[")]
    stamp = r"\[\d\d:\d\d:\d\d\] "
    d = r"(\d+ s|\d+m\d\ds|\d+h\d\dm)"  # a duration, as dpolab.progress.duration writes it
    expected = [rf"baseline eval done in {d}; elapsed {d}$"]
    for i, cell in enumerate(["length-biased-judge__dpo__s0", "length-biased-judge__ipo__s0"], start=1):
        left = "" if i == 1 else rf"; about {d} left"  # no estimate before the first cell ends
        expected += [rf"cell {i}/2 {cell}: started; elapsed {d}{left}$"]
        expected += [rf"{cell}: {phase} done in {d}; elapsed {d}{left}$" for phase in ("pairs", "train", "eval")]
        expected += [rf"cell {i}/2 {cell}: done in {d}; elapsed {d}; about {d} left$"]
    expected += [rf"results done in {d}; elapsed {d}; about 0 s left$"]
    assert len(lines) == len(expected), out
    for line, pattern in zip(lines, expected):
        assert re.match(stamp + pattern, line), (line, pattern)
