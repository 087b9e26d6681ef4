"""The run summary and `dpolab compare` keep every name whole at any width, on a terminal, in a pipe or a file;
`dpolab show` prints what the run printed at its end; --format markdown, csv and json carry full names and numbers."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dpolab.cli import app
from dpolab.errors import ConfigError
from dpolab.experiment.results import ResultRow, write_results
from dpolab.experiment.summary import (COMPARE_COLUMNS, MATRIX_COLUMNS, behaviours, compare_record, compare_runs,
                                       matrix_entries, print_summary)
from dpolab.stats import Verdict

PROBES = ("persuasion", "toxicity", "verbosity", "knowledge")
HEADLINES = [b for b in behaviours() if b.probe in PROBES]
DETAILS = ("accuracy|domain=science", "accuracy|domain=history")  # knowledge metrics that read alike when cut
CELLS = [("length-biased-judge", "dpo", "shuffled:length-biased-judge"), ("shuffled:length-biased-judge", "dpo", None),
         ("detox", "odpo", "shuffled:detox"), ("shuffled:detox", "odpo", None), ("user-data", "dpo", None)]
CLI_ENV = {"COLUMNS": "100", "FORCE_COLOR": None, "TTY_COMPATIBLE": None, "NO_COLOR": None}  # a pipe 100 wide


def row(**fields) -> ResultRow:
    required = {c: None for c, f in ResultRow.model_fields.items() if f.is_required()}
    return ResultRow(**(required | {"verdict": Verdict.UNCLEAR} | fields))


def run_rows(shift: float = 0.0, *, details: tuple[str, ...] = DETAILS) -> list[ResultRow]:
    """A finished run's pooled rows: every headline metric of four probes and two knowledge details per cell, the
    real cells beside their placebos; `shift` moves the values (and flips some verdicts) for a second run."""
    rows = []
    for i, (context, method, placebo) in enumerate(CELLS):
        metrics = [(b.probe, b.metric) for b in HEADLINES] + [("knowledge", m) for m in details]
        for j, (probe, metric) in enumerate(metrics):
            delta = round(0.01 * (i + 1) * (j - 4) + shift, 4)
            lo, hi = delta - 0.05, delta + 0.05
            verdict = Verdict.UNCLEAR if lo <= 0 <= hi else Verdict.IMPROVED if delta > 0 else Verdict.HARMED
            rows.append(row(context=context, method=method, seed=None, seeds=3, probe=probe, metric=metric,
                            value=0.5 + delta, ci_low=0.45 + delta, ci_high=0.55 + delta, n=40 + j, baseline=0.5,
                            delta=delta, delta_ci_low=lo, delta_ci_high=hi, verdict=verdict, q_value=0.01 * (j + 1),
                            mde=0.08, placebo=placebo,
                            **({"delta_vs_placebo": delta / 2, "delta_vs_placebo_ci_low": delta / 2 - 0.05,
                                "delta_vs_placebo_ci_high": delta / 2 + 0.05, "verdict_vs_placebo": Verdict.UNCLEAR}
                               if placebo else {})))
    return rows


def make_run(path, rows: list[ResultRow] | None = None):
    """A run folder as `dpolab run` leaves it, as far as show and compare read it."""
    path.mkdir(parents=True)
    (path / "experiment.json").write_text("{}")
    if rows is not None:
        write_results(rows, path / "results.parquet")
    return path


def printed(fn, *, width: int, terminal: bool) -> str:
    out = io.StringIO()
    fn(Console(file=out, width=width, force_terminal=terminal, color_system=None))
    return out.getvalue()


def assert_readable(text: str, names: set[str], width: int) -> None:
    lines = text.splitlines()
    for name in names:
        assert any(name in line for line in lines), f"{name!r} is not whole on any line"
    assert "…" not in text
    too_long = [line for line in lines if len(line) > width]
    assert not too_long, too_long


LAYOUTS = [(80, True), (80, False), (200, True), (200, False)]


@pytest.mark.parametrize("width, terminal", LAYOUTS)
def test_run_summary_keeps_every_name_whole(width, terminal):
    rows = run_rows()
    text = printed(lambda c: print_summary(rows, c), width=width, terminal=terminal)
    names = {x for r in rows if r.metric not in DETAILS for x in (r.context, r.method, r.probe, r.metric)}
    assert_readable(text, names | {"neg_acc@3", "length-biased-judge", "shuffled:detox"}, width)
    # a table only on a terminal that holds it whole; blocks in 80 columns and in a pipe
    assert ("┃" in text) == (terminal and width == 200)
    for e in matrix_entries(rows) + matrix_entries(rows, "placebo"):
        assert f"{e.delta:+.3f}" in text and f"[{e.delta_ci_low:+.3f}, {e.delta_ci_high:+.3f}]" in text
    assert "What moved (Δ vs placebo" in text and "Seed findings:" in text


@pytest.mark.parametrize("width, terminal", LAYOUTS)
def test_compare_keeps_every_name_whole(tmp_path, width, terminal):
    a = make_run(tmp_path / "a", run_rows())
    b = make_run(tmp_path / "b", run_rows(0.2, details=DETAILS[:1]))  # accuracy|domain=history only in A
    diffs = []
    text = printed(lambda c: diffs.extend(compare_runs(a, b, show_all=True, console=c)), width=width, terminal=terminal)
    rows = run_rows()
    assert_readable(text, {x for r in rows for x in (r.context, r.method, r.probe, r.metric)}, width)
    assert ("┃" in text) == (terminal and width == 200)
    assert len(diffs) == len(rows)
    for d in diffs:
        assert f"{d['a'].value:.3f} [{d['a'].ci_low:.3f}, {d['a'].ci_high:.3f}]" in text
    assert "only in A" in text and "verdict" in text


def test_a_table_is_used_only_where_it_fits_whole():
    from dpolab.experiment.layout import fitted_table

    headers, rows = ["context / method", "metric"], [["length-biased-judge / dpo", "accuracy|domain=science"]]
    width = 3 + len(rows[0][0]) + 3 + len(rows[0][1]) + 1  # borders and padding around each column
    assert fitted_table(Console(file=io.StringIO(), width=width - 1, force_terminal=True), headers, rows) is None
    assert fitted_table(Console(file=io.StringIO(), width=width, force_terminal=False), headers, rows) is None
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    table = fitted_table(console, headers, rows)
    console.print(table)
    text = console.file.getvalue()
    assert rows[0][0] in text and rows[0][1] in text and max(map(len, text.splitlines())) == width


def test_show_prints_what_the_run_printed(tmp_path, monkeypatch):
    from dpolab.experiment import runner

    rows = run_rows()

    def fake_run(spec, out, **kw):  # the grid is tested elsewhere; here only what the command prints after it
        make_run(Path(out), rows)
        return runner.RunReport(out=Path(out), rows=rows)

    monkeypatch.setattr(runner, "run_experiment", fake_run)
    out = tmp_path / "run"
    ran = CliRunner().invoke(app, ["run", "--out", str(out)], env=CLI_ENV)
    assert ran.exit_code == 0, ran.output
    shown = CliRunner().invoke(app, ["show", str(out)], env=CLI_ENV)
    assert shown.exit_code == 0, shown.output
    assert shown.output == ran.output == printed(lambda c: print_summary(rows, c), width=100, terminal=False)
    assert "What moved" in shown.output and "Seed findings:" in shown.output


def test_show_formats_carry_the_matrix_rows(tmp_path):
    rows = run_rows()
    run = make_run(tmp_path / "run", rows)
    entries = matrix_entries(rows) + matrix_entries(rows, "placebo")

    def show(fmt: str) -> str:
        result = CliRunner().invoke(app, ["show", str(run), "--format", fmt], env=CLI_ENV)
        assert result.exit_code == 0, result.output
        return result.output

    parsed = list(csv.DictReader(io.StringIO(show("csv"))))
    assert list(parsed[0]) == MATRIX_COLUMNS and len(parsed) == len(entries)
    for line, e in zip(parsed, entries):
        assert (line["against"], line["context"], line["method"], line["probe"], line["metric"], line["verdict"]) == (
            e.against, e.context, e.method, e.probe, e.metric, e.verdict.value)
        assert line["seed"] == "" and float(line["delta"]) == e.delta and int(line["n"]) == e.n
    objects = json.loads(show("json"))
    assert objects == [{**vars(e), "verdict": e.verdict.value} for e in entries]
    markdown = show("markdown")
    assert markdown.count("### What moved") == 2 and "### Seed findings" in markdown
    for e in entries:
        assert f"| {e.context} | {e.method} | {e.behaviour} | {e.probe} | {e.metric} |" in markdown


def test_compare_formats_carry_the_differences(tmp_path):
    a = make_run(tmp_path / "a", run_rows())
    b = make_run(tmp_path / "b", run_rows(0.2, details=DETAILS[:1]))
    diffs = compare_runs(a, b, show_all=True, console=Console(file=io.StringIO()))
    records = [compare_record(d) for d in diffs]

    def compare(fmt: str) -> str:
        result = CliRunner().invoke(app, ["compare", str(a), str(b), "--all", "--format", fmt], env=CLI_ENV)
        assert result.exit_code == 0, result.output
        return result.output

    def number(x: str) -> float | None:
        return None if x == "" else float(x)

    parsed = list(csv.DictReader(io.StringIO(compare("csv"))))
    assert list(parsed[0]) == COMPARE_COLUMNS and len(parsed) == len(records)
    for line, r in zip(parsed, records):
        assert [line[k] for k in ("context", "method", "probe", "metric", "differs")] == [
            r[k] for k in ("context", "method", "probe", "metric", "differs")]
        assert [number(line[k]) for k in ("a_value", "a_ci_low", "b_value", "b_ci_high")] == [
            r[k] for k in ("a_value", "a_ci_low", "b_value", "b_ci_high")]
    assert {(x["metric"], x["differs"]) for x in parsed} >= {("accuracy|domain=history", "only in A")}
    objects = json.loads(compare("json"))
    assert objects == [{k: v.value if isinstance(v, Verdict) else v for k, v in r.items()} for r in records]
    markdown = compare("markdown")
    assert r"| accuracy\|domain=science |" in markdown and r"| accuracy\|domain=history |" in markdown
    assert len([x for x in markdown.splitlines() if x.startswith("| ")]) == len(records) + 1  # the header


def test_show_says_what_is_wrong_with_the_folder(tmp_path):
    def error(path) -> str:
        result = CliRunner().invoke(app, ["show", str(path)])
        assert isinstance(result.exception, ConfigError)
        return str(result.exception)

    assert "does not exist" in error(tmp_path / "nowhere") and str(tmp_path / "nowhere") in error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "not a `dpolab run` folder" in error(tmp_path / "empty")
    unfinished = make_run(tmp_path / "unfinished")
    assert "has no results yet" in error(unfinished) and "--resume" in error(unfinished)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.parquet").write_text("not parquet")
    assert str(tmp_path / "bad" / "results.parquet") in error(tmp_path / "bad")


def test_show_error_is_one_line_without_a_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dpolab", "show", str(tmp_path / "nowhere")], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and f"error: {tmp_path / 'nowhere'} does not exist" in proc.stderr


def test_a_missing_interval_reads_no_ci():
    rows = [row(context="detox", method="dpo", seed=None, probe="toxicity", metric="mean_score", baseline=0.1,
                value=0.2, delta=0.1, delta_ci_low=math.nan, delta_ci_high=math.nan, n=2)]
    text = printed(lambda c: print_summary(rows, c), width=80, terminal=False)
    assert "Δ +0.100 (no CI)" in text and "nan" not in text


def test_nan_survives_every_format():
    rows = [row(context="detox", method="dpo", seed=None, probe="toxicity", metric="mean_score", baseline=0.1,
                value=0.05, delta=math.nan, delta_ci_low=math.nan, delta_ci_high=math.nan, n=0)]
    text = printed(lambda c: print_summary(rows, c), width=80, terminal=False)
    assert "Δ +nan (no CI)" in text  # a change that could not be computed, and no interval
    as_json = printed(lambda c: print_summary(rows, c, fmt="json"), width=80, terminal=False)
    assert json.loads(as_json)[0]["delta"] is None  # JSON has no NaN
    as_csv = printed(lambda c: print_summary(rows, c, fmt="csv"), width=80, terminal=False)
    assert next(csv.DictReader(io.StringIO(as_csv)))["delta"] == ""


def test_q_and_n_stay_together_when_the_numbers_line_is_full():
    """At 80 columns a long numbers line keeps q and n together on their own line; a short one keeps them on it."""
    wide = row(context="detox", method="profs", seed=None, probe="knowledge", metric="perplexity", baseline=13.2,
               value=-18123.21234, delta=-18136.41234, delta_ci_low=-18232.0123, delta_ci_high=-18030.0123, n=1234,
               q_value=0.00123, verdict=Verdict.HARMED)
    short = row(context="detox", method="dpo", seed=None, probe="toxicity", metric="mean_score", baseline=0.1,
                value=0.2, delta=0.1, delta_ci_low=0.05, delta_ci_high=0.15, n=32, q_value=0.01,
                verdict=Verdict.HARMED)
    for r, alone in ((wide, True), (short, False)):
        lines = printed(lambda c: print_summary([r], c), width=80, terminal=False).splitlines()
        numbers = next(i for i, line in enumerate(lines) if line.startswith("      ") and "Δ" in line)
        assert all(len(line) <= 80 for line in lines)
        if alone:
            assert "n=" not in lines[numbers] and lines[numbers + 1].strip() == "q=0.0012 n=1234", lines
        else:
            assert lines[numbers].endswith("q=0.01 n=32"), lines


def test_compare_says_no_ci_where_a_value_has_none(tmp_path):
    a = run_rows()
    b = [r.model_copy(update={"value": r.value + 0.5, "ci_low": math.nan, "ci_high": math.nan}) for r in run_rows()]
    text = printed(lambda c: compare_runs(make_run(tmp_path / "a", a), make_run(tmp_path / "b", b), console=c),
                   width=80, terminal=False)
    assert "(no CI)" in text and "nan" not in text


def test_compare_says_in_one_line_that_a_cell_is_in_one_run_only(tmp_path):
    a = run_rows()
    b = [r for r in run_rows() if r.method != "odpo"]  # B never ran detox / odpo (nor its placebo)
    n = sum(1 for r in a if r.cell == ("detox", "odpo", None))
    run_a, run_b = make_run(tmp_path / "a", a), make_run(tmp_path / "b", b)
    text = printed(lambda c: compare_runs(run_a, run_b, console=c), width=80, terminal=False)
    assert f"detox / odpo: only in A ({n} metrics; --all lists them)" in text
    assert "toxicity · mean_score  (only in A)" not in text
    listed = printed(lambda c: compare_runs(run_a, run_b, show_all=True, console=c), width=80, terminal=False)
    assert "only in A (" not in listed and listed.count("(only in A)") == 2 * n  # detox and shuffled:detox
