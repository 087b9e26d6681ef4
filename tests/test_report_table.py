"""The report wherever it is read: one number format (dpolab.numbers), n printed in every matrix cell, the rows table
sorted and filtered in a real browser, links to the run's files, and `dpolab report RUN` rebuilding report.html.

The run folder is tests/test_report.py's synthetic experiment (the runner's own writers, no model, no training).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest

from dpolab.numbers import MINUS, ci, num, percent
from dpolab.report import write_report
from dpolab.report.views import RUN_FILES
from tests.browser import require_chromium
from tests.test_report import DevTools, make_experiment

GENERATED = re.compile(r'<span class="generated">[^<]*</span>')  # the generation time: the one part that varies
WALL_S = 731.25  # the run's wall time: more than its phases add up to (time between phases, writing results)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run folder, its report.html written as the runner writes it: timings.json first, then the report
    with the same phases passed in. As in a pooled run, only the main rows (no breakdowns) have a q-value and an
    MDE, some of them tied."""
    from dpolab.experiment.results import read_results, write_results

    out = make_experiment(tmp_path_factory.mktemp("table") / "run-a")
    rows = read_results(out / "results.parquet")
    main = {"q_value": lambda i: 0.0004 + (i % 13) / 40, "mde": lambda i: 0.05 + (i % 7) / 9}
    write_results([r if "|" in r.metric else r.model_copy(update={k: f(i) for k, f in main.items()})
                   for i, r in enumerate(rows)], out / "results.parquet")
    timings = json.loads((out / "timings.json").read_text())
    timings["total_s"] = WALL_S
    (out / "timings.json").write_text(json.dumps(timings))
    write_report(out, phases=[tuple(p) for p in timings["phases"]])
    return out


@pytest.fixture(scope="module")
def html(run) -> str:
    return (run / "report.html").read_text(encoding="utf-8")


# -- the number format -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x, signed, text", [
    (-7.688, True, "−7.69"), (-28.49, True, "−28.5"), (12.55, True, "+12.6"), (123.4, False, "123"),
    (0.2, False, "0.200"), (0.5, True, "+0.500"), (0.012345, False, "0.0123"), (1.0, False, "1.00"),
    (9.996, False, "10.0"), (99.96, False, "100"), (1234.5, False, "1234"), (-98765.4, True, "−98765"),
    (0.00012345, False, "0.000123"), (1.234e-5, False, "1.23e−5"), (-1e-9, True, "−1.00e−9"),
    (0.0, True, "0"), (-0.0, False, "0"), (37, False, "37"), (-3, True, "−3"), (12, True, "+12"),
    (math.inf, True, "+∞"), (-math.inf, False, "−∞"),
    (None, False, "—"), (math.nan, True, "—"), (float("nan"), False, "—"),
])
def test_num_writes_three_significant_digits(x, signed, text):
    assert num(x, signed=signed) == text


def test_num_uses_a_true_minus_and_no_hyphen():
    assert MINUS == "\u2212" and num(-0.5) == "\u22120.500" and "-" not in num(-1e-7)


def test_ci_and_percent_use_num():
    assert ci(-28.49, 12.55, signed=True) == "[−28.5, +12.6]"
    assert ci(0.1234, 0.5) == "[0.123, 0.500]"
    assert ci(None, math.nan) == ""
    assert ci(None, 0.3) == "[—, 0.300]"  # one bound known: the other shown missing
    assert percent(0.1234) == "12.3%" and percent(-0.5, signed=True) == "−50.0%" and percent(None) == "—"


FORMAT_SPEC = re.compile(r"\{[^{}]*:[<>^=]?[+\- ]?\d*,?(\.\d+)?[fgeFGE%]\}|%[+\- ]?\d*\.\d+[fge]|\|\s*(round|format)\b")


def test_every_formatter_of_the_report_is_num():
    """No number in the report is formatted on its own: the report's modules hold no float format spec."""
    report = Path(__file__).resolve().parents[1] / "dpolab" / "report"
    for path in [*report.glob("*.py"), *report.glob("templates/**/*.j2")]:
        if path.name == "plots.py":  # figures: matplotlib writes the axes
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FORMAT_SPEC.search(line) and "CSS" not in line:
                pytest.fail(f"{path.name}:{i} formats a number itself: {line.strip()}")


# a number as the report writes it: sign, then 3 significant digits (or a whole count, or "0", or 1.23e−5)
NUMBER = re.compile(r"[−+]?(?:\d+\.\d+(?:e−?\d+)?|\d+)")


def _significant(token: str) -> int | None:
    """Significant digits of a number with a decimal point; None for a whole number (a count, or 3+ whole digits)."""
    mantissa = token.lstrip("−+").split("e")[0]
    if "." not in mantissa:
        return None
    return len(mantissa.replace(".", "").lstrip("0"))


def _cells(html: str, table_id_or_class: str) -> list[str]:
    table = html.split(table_id_or_class, 1)[1].split("</table>", 1)[0]
    cells = re.findall(r'<td class="(?:num|m [a-z]+)"[^>]*>(.*?)</td>', table, re.DOTALL)
    return [unescape(re.sub(r"<[^>]+>", " ", c)) for c in cells]


def test_numbers_in_the_tables_have_one_format(html):
    for where in ('id="rows-table"', '<table class="matrix">'):
        cells = _cells(html, where)
        assert cells
        for text in cells:
            assert not re.search(r"(?<![\w.])-\d", text), f"a hyphen for a minus in {text!r}"
            for token in NUMBER.findall(text):
                digits = _significant(token)
                assert digits in (None, 3), f"{token!r} in {text!r} is not 3 significant digits"
    assert "−" in html and "[−" in html


# -- the matrix --------------------------------------------------------------------------------------------------

def test_every_matrix_cell_prints_n(run, html):
    """n is in each coloured cell's text, not only in its hover title: a printout or a screenshot keeps it."""
    from dpolab.experiment.results import read_results
    from dpolab.experiment.summary import behaviours, last_turn

    rows = read_results(run / "results.parquet")
    heads = {(b.probe, last_turn(rows, b.probe, b.metric)) for b in behaviours(rows)}
    expected = sorted(r.n for r in rows if (r.probe, r.metric) in heads)
    matrix = html.split('<table class="matrix">')[1].split("</table>")[0]
    cells = re.findall(r'<td class="m (?:imp|harm|none)" title="[^"]*">(.*?)</td>', matrix, re.DOTALL)
    shown = []
    for cell in cells:
        found = re.findall(r"\bn (\d+)\b", re.sub(r"<[^>]+>", " ", cell))
        assert len(found) == 1, cell
        shown.append(int(found[0]))
    assert sorted(shown) == expected and len(cells) == len(expected) > 0


# -- links and the rebuild ---------------------------------------------------------------------------------------

def test_rows_link_to_the_runs_files(run, html):
    for name in RUN_FILES:
        assert (run / name).is_file()
        assert f'href="{name}"' in html
    bare = tmp = run.parent / "no-files"
    shutil.copytree(run, tmp)
    for name in RUN_FILES:
        (bare / name).unlink()
    assert not any(f'href="{name}"' in write_report(bare).read_text(encoding="utf-8") for name in RUN_FILES)


def test_report_command_rebuilds_the_runs_own_report(run, tmp_path):
    """`dpolab report` on a copy of the run folder gives the report the run wrote, but for the generation time."""
    from typer.testing import CliRunner

    from dpolab.cli import app

    copy = tmp_path / "elsewhere" / run.name  # the header names the folder, not its path
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert str(copy / "report.html") in result.output
    original = (run / "report.html").read_text(encoding="utf-8")
    rebuilt = (copy / "report.html").read_text(encoding="utf-8")
    assert len(GENERATED.findall(original)) == 1 and len(GENERATED.findall(rebuilt)) == 1
    assert GENERATED.sub("", rebuilt) == GENERATED.sub("", original)
    assert f"Total {num(WALL_S / 60)} min" in rebuilt  # the run's wall time from timings.json, not the phases' sum


def test_report_command_refuses_what_is_not_a_finished_run(run, tmp_path):
    from dpolab.errors import DataError
    from dpolab.report.write import rebuild_report

    nowhere = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, "-m", "dpolab", "report", str(nowhere)], check=False, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {nowhere}: no such folder; give the folder `dpolab run` wrote"]
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    (cut / "timings.json").unlink()
    (cut / "report.html").unlink()
    with pytest.raises(DataError, match=rf"^{re.escape(str(cut))}: not a finished run folder, it has no timings\.json"):
        rebuild_report(cut)
    assert not (cut / "report.html").exists()
    with pytest.raises(DataError, match="not a folder"):
        rebuild_report(cut / "results.csv")


# -- the rows table in Chromium ----------------------------------------------------------------------------------

class Page:
    """One page in headless Chromium, driven as a reader would: real mouse clicks and typed text (DevTools Input)."""

    def __init__(self, chromium: str, path: Path, profile: Path):
        self.browser = DevTools(chromium, profile)
        target = self.browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.browser.send(f"{domain}.enable", session=self.session)
        self.browser.send("Page.navigate", {"url": path.resolve().as_uri()}, session=self.session)
        self.browser.wait_for("Page.loadEventFired")
        self.browser.settle(0.3)

    def eval(self, expression: str):
        got = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                session=self.session)
        assert "exceptionDetails" not in got, got["exceptionDetails"]
        return got["result"].get("value")

    def click(self, element: str) -> None:
        """Click the middle of `element` (a JS expression for it), scrolled into view."""
        x, y = self.eval(f"(() => {{ const e = {element}; e.scrollIntoView({{block: 'center'}});"
                         " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            event = {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}
            self.browser.send("Input.dispatchMouseEvent", event, session=self.session)

    def type(self, element: str, text: str) -> None:
        """Click into a text box and type `text` over what it holds."""
        self.click(element)
        self.eval(f"{element}.select()")
        self.browser.send("Input.insertText", {"text": text}, session=self.session)

    def problems(self) -> list[str]:
        """Console errors and warnings, exceptions, refused scripts and failed loads so far."""
        self.browser.settle(0.2)
        out = []
        for e in self.browser.events:
            kind, p = e.get("method"), e.get("params", {})
            if kind == "Runtime.exceptionThrown":
                out.append(str(p["exceptionDetails"]))
            elif kind == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(str(p.get("args")))
            elif kind == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(p["entry"]["text"])
        return out


def header(label: str) -> str:
    return f"[...document.querySelectorAll('#rows-table th')].find(th => th.textContent.trim() === {json.dumps(label)})"


SHOWN = """[...document.querySelectorAll('#rows-table tbody tr')].filter(tr => !tr.hidden)
  .map(tr => ({order: Number(tr.dataset.order), probe: tr.cells[3].textContent, text: tr.textContent}))"""


def test_rows_table_sorts_and_filters_in_chromium(run, tmp_path):
    from dpolab.experiment.results import read_results

    chromium = require_chromium()
    rows = read_results(run / "results.parquet")
    n = len(rows)
    page = Page(chromium, run / "report.html", tmp_path / "profile")
    try:
        assert page.eval("document.getElementById('rows-tools').hidden") is False  # the script ran
        assert page.eval("document.getElementById('rows-count').textContent") == f"{n} of {n} rows"
        page.eval("document.querySelector('#rows details').open = true")

        # a numeric column: by value, a missing value last in either direction, ties in the file's order
        missing = [i for i, r in enumerate(rows) if r.q_value is None or math.isnan(r.q_value)]
        known = [i for i in range(n) if i not in missing]
        assert missing and known
        page.click(header("q"))
        assert [r["order"] for r in page.eval(SHOWN)] == sorted(known, key=lambda i: (rows[i].q_value, i)) + missing
        assert page.eval(f"{header('q')}.getAttribute('aria-sort')") == "ascending"
        page.click(header("q"))
        assert [r["order"] for r in page.eval(SHOWN)] == sorted(known, key=lambda i: (-rows[i].q_value, i)) + missing
        page.click(header("Δ"))
        deltas = [i for i in range(n) if not math.isnan(rows[i].delta)]
        assert [r["order"] for r in page.eval(SHOWN)][:len(deltas)] == sorted(deltas, key=lambda i: (rows[i].delta, i))

        # a text column: alphabetical
        page.click(header("probe"))
        shown = page.eval(SHOWN)
        assert [(r["probe"], r["order"]) for r in shown] == sorted((r.probe, i) for i, r in enumerate(rows))

        # typed words, all of them found in a row; then a column's drop-down on top
        page.type("document.getElementById('rows-filter')", "toxicity MEAN")
        shown = page.eval(SHOWN)
        expected = [i for i, r in enumerate(rows) if r.probe == "toxicity" and "mean" in r.metric]
        assert sorted(r["order"] for r in shown) == expected and expected
        assert page.eval("document.getElementById('rows-count').textContent") == f"{len(expected)} of {n} rows"
        page.eval("""(() => { const s = document.querySelector('#rows-tools select[data-key=verdict]');
                     s.value = 'harmed'; s.dispatchEvent(new Event('change')); })()""")
        harmed = [i for i in expected if rows[i].verdict == "harmed"]
        assert sorted(r["order"] for r in page.eval(SHOWN)) == harmed and harmed
        assert page.eval("document.getElementById('rows-count').textContent") == f"{len(harmed)} of {n} rows"

        # a hyphen typed finds the report's minus signs
        page.eval("""(() => { const s = document.querySelector('#rows-tools select[data-key=verdict]');
                     s.value = ''; s.dispatchEvent(new Event('change')); })()""")
        page.type("document.getElementById('rows-filter')", "-0.")
        shown = page.eval(SHOWN)
        assert shown and all("−0." in r["text"] for r in shown)
        assert page.problems() == []  # the script ran under the page's CSP, and nothing failed
    finally:
        page.browser.close()
