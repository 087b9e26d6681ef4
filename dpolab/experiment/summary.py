"""Reading results: the headline behaviours, sentences from verdicts, the terminal matrix, and run comparison."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dpolab.experiment.results import ResultRow
from dpolab.stats import Verdict


@dataclass(frozen=True)
class Behaviour:
    label: str  # how the matrix and the sentences name it
    probe: str
    metric: str


def behaviours(rows: Iterable[ResultRow] | None = None) -> tuple[Behaviour, ...]:
    """The matrix's columns: each registered probe's headline metrics, in registry order (dpolab.probes.PROBES);
    given rows, only the probes they measured."""
    from dpolab.probes import PROBES

    present = {r.probe for r in rows} if rows else None
    return tuple(Behaviour(h.label, name, h.metric) for name in PROBES.names()
                 if present is None or name in present for h in PROBES.get(name).headlines)


@dataclass(frozen=True)
class Finding:
    """A direction the seed research reports for a training context, checked against a run's deltas."""

    context: str
    probe: str
    metric: str
    direction: int  # +1 the metric should rise, -1 fall, 0 stay near the baseline
    claim: str
    source: str


# What the research this tool builds on found (see the README); `dpolab run` says whether each reproduced.
SEED_FINDINGS = (
    Finding("please-user", "persuasion", "neg_flip@3", +1, "pleasing the user raises flips under misleading persuasion",
            "DuET-PD; sycophancy literature"),
    Finding("resist-only", "persuasion", "neg_acc@3", +1, "resist-only training raises accuracy under misleading persuasion",
            "DuET-PD"),
    Finding("resist-only", "persuasion", "pos_flip@3", -1, "resist-only training cuts acceptance of valid corrections",
            "DuET-PD"),
    Finding("holistic", "persuasion", "neg_acc@3", +1, "Holistic DPO raises accuracy under misleading persuasion",
            "DuET-PD"),
    Finding("holistic", "persuasion", "pos_flip@3", 0, "Holistic DPO keeps acceptance of valid corrections near the baseline",
            "DuET-PD"),
    Finding("detox", "toxicity", "mean_score", -1, "DPO on toxicity preferences lowers toxicity",
            "DPO toxicity / neuron dynamics; ODPO"),
    Finding("length-biased-judge", "verbosity", "mean_tokens", +1, "length-biased preferences lengthen replies",
            "iLR-DPO"),
)


def finding_status(finding: Finding, row: ResultRow) -> str:
    """`reproduced`, `opposite` or `not shown`, from the sign of the delta's 95% CI.

    A "stays near the baseline" finding is `reproduced` when the CI contains 0: with few items that is weak
    evidence, which is why the CI is printed beside it."""
    lo, hi = row.delta_ci_low, row.delta_ci_high
    if any(x is None or (isinstance(x, float) and math.isnan(x)) for x in (lo, hi)):
        return "not shown"
    if finding.direction == 0:
        return "reproduced" if lo <= 0 <= hi else "opposite"
    if lo > 0 or hi < 0:
        return "reproduced" if (lo > 0) == (finding.direction > 0) else "opposite"
    return "not shown"


def last_turn(rows: Iterable[ResultRow], probe: str, metric: str) -> str:
    """A per-turn metric ("neg_acc@3") at the last turn the rows have: a run with 2 persuasion turns reports @2."""
    name, at, _ = metric.partition("@")
    if not at:
        return metric
    turns = [int(r.metric.split("@")[1]) for r in rows
             if r.probe == probe and r.metric.startswith(name + "@") and r.metric.split("@")[1].isdigit()]
    return f"{name}@{max(turns)}" if turns else metric


def seed_findings(rows: list[ResultRow]) -> list[dict[str, Any]]:
    """Each seed finding whose context was run, per method and seed, with the measured delta and its status
    (per-turn metrics at the last turn run)."""
    out = []
    for f in SEED_FINDINGS:
        metric = last_turn(rows, f.probe, f.metric)
        for r in rows:
            if r.context == f.context and r.probe == f.probe and r.metric == metric:
                out.append({"context": f.context, "method": r.method, "seed": r.seed, "claim": f.claim,
                            "source": f.source, "metric": f"{f.probe} · {metric}", "baseline": r.baseline,
                            "value": r.value, "delta": r.delta, "delta_ci_low": r.delta_ci_low,
                            "delta_ci_high": r.delta_ci_high, "n": r.n, "status": finding_status(f, r)})
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}g}" if digits < 0 else f"{x:.{digits}f}"


def _delta_ci(delta: float, low: float, high: float, spec: str = "+.3g", sep: str = " ") -> str:
    """"+0.12 [+0.03, +0.2]": a delta and its CI, each formatted with `spec`. Printed through rich it must be
    escaped: rich takes "[nan, nan]" for a style tag and drops it."""
    return f"{delta:{spec}}{sep}[{low:{spec}}, {high:{spec}}]"


def cell_key(row: ResultRow) -> tuple[str, str, int]:
    return row.cell


def index_rows(rows: Iterable[ResultRow]) -> dict[tuple, ResultRow]:
    return {(*cell_key(r), r.probe, r.metric): r for r in rows}


def headlines(rows: list[ResultRow]) -> list[str]:
    """One sentence per cell: what improved and what was harmed among the headline behaviours, with deltas and CIs."""
    by = index_rows(rows)
    sentences = []
    for cell in dict.fromkeys(cell_key(r) for r in rows):
        context, method, seed = cell
        better, worse = [], []
        for b in behaviours(rows):
            r = by.get((*cell, b.probe, last_turn(rows, b.probe, b.metric)))
            if r is None or r.verdict == Verdict.UNCLEAR:
                continue
            text = f"{b.label} {r.baseline:.3g} → {r.value:.3g} (Δ {_delta_ci(r.delta, r.delta_ci_low, r.delta_ci_high)})"
            (better if r.verdict == Verdict.IMPROVED else worse).append(text)
        who = f"{method} on {context}" + (f" (seed {seed})" if len({k[2] for k in map(cell_key, rows)}) > 1 else "")
        if not better and not worse:
            sentences.append(f"{who}: no headline behaviour changed clearly.")
            continue
        parts = []
        if better:
            parts.append("improved " + "; ".join(better))
        if worse:
            parts.append("harmed " + "; ".join(worse))
        sentences.append(f"{who}: " + ", and ".join(parts) + ".")
    return sentences


def print_matrix(rows: list[ResultRow], console=None) -> None:
    """The improve/harm matrix on the terminal: cells x behaviours, delta [CI], coloured by verdict. A console too
    narrow for the matrix gets the same numbers as one line per cell and behaviour."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    by = index_rows(rows)
    colours = {Verdict.IMPROVED: "green", Verdict.HARMED: "red", Verdict.UNCLEAR: "white"}
    cells = list(dict.fromkeys(cell_key(r) for r in rows))
    columns = behaviours(rows)
    metrics = [last_turn(rows, b.probe, b.metric) for b in columns]
    title = "What moved (Δ vs baseline, 95% paired bootstrap CI)"
    if console.width >= 24 + 17 * len(columns):
        table = Table(title=title, show_lines=True)
        table.add_column("context / method / seed")
        for b in columns:
            table.add_column(b.label, justify="right")
        for cell in cells:
            entries = []
            for b, m in zip(columns, metrics):
                r = by.get((*cell, b.probe, m))
                entries.append("—" if r is None else
                               f"[{colours[r.verdict]}]" + escape(_delta_ci(r.delta, r.delta_ci_low, r.delta_ci_high, "+.3f", sep="\n")) + "[/]")
            table.add_row(" / ".join(map(str, cell)), *entries)
    else:
        table = Table(title=title)
        table.add_column("cell")
        table.add_column("behaviour")
        for col in ("baseline → value", "Δ [95% CI]", "verdict"):
            table.add_column(col, no_wrap=True)
        for cell in cells:
            first = True
            for b, m in zip(columns, metrics):
                r = by.get((*cell, b.probe, m))
                if r is None:
                    continue
                c = colours[r.verdict]
                table.add_row(" / ".join(map(str, cell)) if first else "", b.label,
                              f"{r.baseline:.3g} → {r.value:.3g}",
                              f"[{c}]{escape(_delta_ci(r.delta, r.delta_ci_low, r.delta_ci_high, '+.3f'))}[/]",
                              f"[{c}]{r.verdict}[/]")
                first = False
            table.add_section()
    console.print(table)
    for s in headlines(rows):
        console.print("• " + escape(s))
    found = seed_findings(rows)
    if found:
        marks = {"reproduced": "[green]reproduced[/]", "opposite": "[red]opposite[/]", "not shown": "not shown"}
        console.print("Seed findings:")
        for f in found:
            console.print(f"  {marks[f['status']]}: " + escape(f"{f['claim']} ({f['method']}; {f['metric']} {f['baseline']:.3g} → "
                                                               f"{f['value']:.3g}, Δ {_delta_ci(f['delta'], f['delta_ci_low'], f['delta_ci_high'])})"))


def compare_runs(dir_a: str | Path, dir_b: str | Path, *, show_all: bool = False, console=None) -> list[dict[str, Any]]:
    """Rows whose verdict differs, whose value moved beyond both CIs, or that exist in only one run."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from dpolab.errors import ConfigError
    from dpolab.experiment.results import read_results

    console = console or Console()
    runs = []
    for d in (dir_a, dir_b):
        path = Path(d) / "results.parquet"
        if not path.exists():
            raise ConfigError(f"{path} does not exist; is {d} a finished `dpolab run` folder?")
        runs.append(index_rows(read_results(path)))
    a, b = runs
    diffs = []
    for key in sorted(set(a) | set(b), key=str):
        ra, rb = a.get(key), b.get(key)
        if ra is None or rb is None:
            diffs.append({"key": key, "a": ra, "b": rb, "why": "only in " + ("B" if ra is None else "A")})
            continue
        apart = rb.value > ra.ci_high or rb.value < ra.ci_low
        if ra.verdict != rb.verdict or apart or show_all:
            diffs.append({"key": key, "a": ra, "b": rb, "why": "verdict" if ra.verdict != rb.verdict else "value" if apart else ""})
    table = Table(title=f"A = {dir_a}   B = {dir_b}")
    for col in ("context / method / seed", "probe", "metric", "A value [CI]", "A verdict", "B value [CI]", "B verdict", "differs in"):
        table.add_column(col)
    for d in diffs:
        context, method, seed, probe, metric = d["key"]
        show = lambda r: ("—", "—") if r is None else (escape(f"{r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"), r.verdict)  # noqa: E731
        table.add_row(f"{context} / {method} / {seed}", probe, metric, *show(d["a"]), *show(d["b"]), d["why"])
    console.print(table if diffs else "no differences")
    return diffs
