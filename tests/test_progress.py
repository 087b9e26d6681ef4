"""Progress in a log: with stdout not a terminal, `dpolab run`, `eval` and `train` print plain lines (one per phase,
cell or task, with the time so far and what is left), not bars: neither their own nor the libraries' loading bars."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

import dpolab.progress as progress_mod
from dpolab.progress import PlainLines, PlainProgress, RichProgress, progress_display
from tests.test_run import TINY_SIZES

STAMP = r"\[\d\d:\d\d:\d\d\] "
D = r"(\d+ s|\d+m\d\ds|\d+h\d\dm)"  # a duration, as dpolab.progress.duration writes it


def stamped(text: str) -> list[str]:
    """The progress lines of an output (a results table may also print)."""
    return [x for x in text.splitlines() if re.match(STAMP, x)]


def no_bars(text: str) -> None:
    assert "\x1b[" not in text and "\r" not in text  # no colour codes, no redrawn bars
    assert "Loading weights" not in text and "Writing model shards" not in text  # transformers' tqdm bars
    # rich's bar, which it prints once when it stops on a non-terminal (a results table draws with ━ too, inside
    # its box: ┏━━┳━━┓, ┡━━╇━━┩)
    assert not [x for x in text.splitlines() if "━" in x and x.lstrip()[:1] not in "┏┡┗"], text


def test_run_into_a_log_prints_plain_lines_per_phase_and_cell(tiny_model_dir, tmp_path):
    spec = {"model": str(tiny_model_dir), "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 1, "save_every": 1000},
            "methods": {"dpo": {"loss": "dpo"}, "ipo": {"loss": "ipo"}},
            "contexts": {"length-biased-judge": {"methods": ["dpo", "ipo"],
                                                 "options": {"n_instructions": 6, "max_new_tokens": 400}}},
            "probes": {"names": ["verbosity", "toxicity"], "sizes": TINY_SIZES}, "n_boot": 200}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "DPOLAB_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    # a real process with stdout and stderr in files, as `bash scripts/main.sh > run.log 2>&1`
    with open(tmp_path / "run.log", "w") as log, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "dpolab", "run", str(path), "--out", str(tmp_path / "run"),
                               "--estimate"],
                              stdout=log, stderr=err, env=env, timeout=900)
    out, err = (tmp_path / "run.log").read_text(), (tmp_path / "err.log").read_text()
    assert proc.returncode == 0, err[-3000:]
    no_bars(out)
    no_bars(err)
    left = rf"; about {D} left"
    # the estimate, calibrated before the baseline eval (its breakdown follows on lines of its own, unstamped)
    expected = [rf"estimate: about (\d+ min|{D}) in all on .+, \d+ threads? \(calibrated in {D}; refined after each "
                rf"cell\); elapsed {D}$"]
    expected += [rf"baseline eval done in {D}; elapsed {D}$"]
    for i, cell in enumerate(["length-biased-judge__dpo__s0", "length-biased-judge__ipo__s0"], start=1):
        # nothing left said before the first cell ends; then the estimate refined by the cells done; none after the last
        during = "" if i == 1 else left
        expected += [rf"cell {i}/2 {cell}: started; elapsed {D}{during}$"]
        expected += [rf"cell {i}/2 {cell}: {phase} done in {D}; elapsed {D}{during}$" for phase in ("pairs", "train", "eval")]
        expected += [rf"cell {i}/2 {cell}: done in {D}; elapsed {D}{left if i == 1 else ''}$"]
    expected += [rf"results done in {D}; elapsed {D}$", rf"report done in {D}; elapsed {D}$"]
    lines = stamped(out)
    assert len(lines) == len(expected), out
    for line, pattern in zip(lines, expected):
        assert re.match(STAMP + pattern, line), (line, pattern)
    # the phases the log names are the ones timings.json records
    timed = [name for name, _ in json.loads((tmp_path / "run" / "timings.json").read_text())["phases"]]
    assert len(timed) == 8 and timed[0] == "baseline eval" and timed[-1] == "results"


def test_run_with_format_csv_keeps_stdout_for_the_summary(tiny_model_dir, tmp_path):
    """`dpolab run --format csv > out.csv`: stdout is the matrix as csv and nothing else; the progress lines go to
    stderr."""
    import csv

    from dpolab.cli import app
    from dpolab.experiment.summary import MATRIX_COLUMNS

    spec = {"model": str(tiny_model_dir), "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 1, "save_every": 1000},
            "methods": {"dpo": {"loss": "dpo"}},
            "contexts": {"length-biased-judge": {"methods": ["dpo"], "placebos": ["shuffled"],
                                                 "options": {"n_instructions": 6, "max_new_tokens": 40}}},
            "probes": {"names": ["verbosity", "toxicity"], "sizes": TINY_SIZES}, "n_boot": 200}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "DPOLAB_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dpolab", "run", str(path), "--out", str(tmp_path / "run"),
                           "--format", "csv"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert list(records[0]) == MATRIX_COLUMNS
    # every cell against the baseline, and the real cell against its placebo: one row per cell, behaviour and
    # comparison, the same rows `dpolab show RUN --format csv` prints
    against = {(r["context"], r["method"], r["against"]) for r in records}
    assert ("length-biased-judge", "dpo", "baseline") in against and ("length-biased-judge", "dpo", "placebo") in against
    shown = CliRunner().invoke(app, ["show", str(tmp_path / "run"), "--format", "csv"])
    assert shown.exit_code == 0 and shown.output == proc.stdout
    assert not stamped(proc.stdout)
    assert any("baseline eval done in" in line for line in stamped(proc.stderr))
    no_bars(proc.stdout)


class Clock:
    """A stand-in for the time module in dpolab.progress: the test moves it, so throttling and estimates are exact."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def strftime(self, fmt: str) -> str:
        return "12:00:00"


def test_plain_progress_ends_each_task_with_a_line_and_throttles_the_rest(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_mod, "time", clock)
    stream = io.StringIO()
    bars = PlainProgress(PlainLines(stream), every=30)
    # the trainer's use: a resumed run at step 4 of 100, a step every 2 s
    tid = bars.add_task("training", total=100, completed=4, info="")
    for step in range(5, 101):
        clock.now += 2
        bars.update(tid, advance=1, info=f"loss {1 / step:.4f}")
    lines = stream.getvalue().splitlines()
    # at most one line per 30 s while it runs (not 96, one per step), and one when it ends
    assert len(lines) == 96 * 2 // 30 + 1, lines
    # 15 steps in 30 s, 81 to go at that pace: 162 s
    assert lines[0] == "[12:00:00] training 19/100 (loss 0.0526); elapsed 30 s; about 2m42s left"
    assert lines[-1] == "[12:00:00] training 100/100 done in 3m12s (loss 0.0100); elapsed 3m12s"
    # a probe's use: the protocol's task; describe renames it, a step beyond the total prints nothing more
    task = bars.task("toxicity", total=2)
    task.describe("toxicity: seed 0")
    clock.now += 5
    task.advance()
    task.advance()
    task.advance()
    assert stream.getvalue().splitlines()[len(lines):] == ["[12:00:00] toxicity: seed 0 2/2 done in 5 s; elapsed 3m17s"]


def test_bars_only_when_stdout_and_stderr_are_terminals(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    monkeypatch.setattr(sys, "stderr", Tty())
    assert isinstance(progress_display(), RichProgress)
    # either one sent to a file (`> run.log`, `2> err.log`) means plain lines
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert isinstance(progress_display(), PlainProgress)
    monkeypatch.setattr(sys, "stdout", Tty())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_display(), PlainProgress)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))


def test_eval_and_train_commands_into_a_log(tiny_model_dir, tmp_path, home):
    from dpolab.cli import app

    runner = CliRunner()  # its output is not a terminal
    ev = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "ev"),
                             "--probes", "verbosity,toxicity", "--limit", "2", "--set", "verbosity.max_new_tokens=4",
                             "--set", "toxicity.max_new_tokens=4", "--set", "toxicity.k=1", "--set", "toxicity.seeds=[0]"])
    assert ev.exit_code == 0, ev.output
    no_bars(ev.output)
    # one line per probe as it ends (the two probes are quick: no line in between)
    lines = stamped(ev.output)
    assert len(lines) == 2, ev.output
    assert re.match(STAMP + rf"verbosity: 2 instructions 1/1 done in {D}; elapsed {D}$", lines[0]), lines
    assert re.match(STAMP + rf"toxicity: seed 0, 2 samples 1/1 done in {D}; elapsed {D}$", lines[1]), lines

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(8)))
    tr = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "tr"),
                             "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3"])
    assert tr.exit_code == 0, tr.output
    no_bars(tr.output)
    lines = stamped(tr.output)
    last = json.loads((tmp_path / "tr" / "metrics.jsonl").read_text().splitlines()[-1])
    assert re.match(STAMP + rf"reference log-probs 8/8 done in {D}; elapsed {D}$", lines[0]), lines
    # the training line carries the last step's loss and margin, as the bar's info field does on a terminal
    info = re.escape(f"(loss {last['loss']:.4f} margin {last['rewards/margins']:+.3f})")
    assert re.match(STAMP + rf"training 2/2 done in {D} {info}; elapsed {D}$", lines[-1]), lines
