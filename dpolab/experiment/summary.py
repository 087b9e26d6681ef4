"""Reading results: the headline behaviours, sentences from verdicts, the terminal matrix, and run comparison."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from dpolab.experiment.layout import Format
from dpolab.experiment.results import ResultRow
from dpolab.numbers import ci, num
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
    Finding("length-biased-judge", "verbosity", "median_tokens", +1, "length-biased preferences lengthen replies",
            "iLR-DPO"),
)


# DuET-PD's own rows (Llama-3.1-8B-Instruct on SALAD-Bench, NEG-Acc@3 / POS-Flip@3 in %, all 7 appeal techniques),
# shown beside dpolab's persuasion findings, labelled as the paper's.
DUETPD_PAPER = (
    {"model": "Llama-3.1-8B-Instruct (base)", "neg_acc@3": 4.21, "pos_flip@3": 71.65},
    {"model": "Llama-3.1-8B-Instruct + Resist DPO", "neg_acc@3": 89.44, "pos_flip@3": 1.22},
    {"model": "Llama-3.1-8B-Instruct + Holistic DPO", "neg_acc@3": 76.54, "pos_flip@3": 70.33},
)
DUETPD_SOURCE = "DuET-PD (arXiv:2508.17450), SALAD-Bench, Llama-3.1-8B-Instruct; the paper gives no intervals"


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def finding_status(finding: Finding, row: ResultRow) -> str:
    """`reproduced`, `refuted` or `not shown`, from the change's 95% CI, its q-value and the MDE.

    A direction (rise or fall) is reproduced when the change is a discovery in that direction (the verdict's rule:
    the CI excludes 0, and q ≤ 0.05 where the row has a q-value) and refuted when it is one in the other direction.
    "Stays near the baseline" is reproduced only when the CI lies inside ±MDE (an equivalence test: any change the
    run could detect is ruled out) and refuted when the change is a discovery either way. Anything else is not
    shown: a CI that merely contains 0 is absence of evidence, not evidence."""
    from dpolab import stats

    lo, hi = row.delta_ci_low, row.delta_ci_high
    if _missing(lo) or _missing(hi):
        return "not shown"
    q = None if _missing(row.q_value) else row.q_value
    discovery = (lo > 0 or hi < 0) and (q is None or q <= stats.FDR)
    if finding.direction == 0:
        near = not _missing(row.mde) and stats.equivalent(lo, hi, row.mde)
        return "refuted" if discovery else "reproduced" if near else "not shown"
    if discovery:
        return "reproduced" if (lo > 0) == (finding.direction > 0) else "refuted"
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
    """Each seed finding whose context was run, per method (and seed, for per-seed rows), with the measured delta,
    its q-value, n, the MDE and its status (per-turn metrics at the last turn run)."""
    out = []
    for f in SEED_FINDINGS:
        metric = last_turn(rows, f.probe, f.metric)
        for r in rows:
            if r.context == f.context and r.probe == f.probe and r.metric == metric:
                out.append({"context": f.context, "method": r.method, "seed": r.seed, "seeds": r.seeds, "claim": f.claim,
                            "source": f.source, "metric": f"{f.probe} · {metric}", "baseline": r.baseline,
                            "value": r.value, "delta": r.delta, "delta_ci_low": r.delta_ci_low,
                            "delta_ci_high": r.delta_ci_high, "q_value": r.q_value, "n": r.n, "mde": r.mde,
                            "status": finding_status(f, r)})
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}g}" if digits < 0 else f"{x:.{digits}f}"


def _delta_ci(delta: float, low: float, high: float, spec: str = "+.3g", sep: str = " ") -> str:
    """"+0.12 [+0.03, +0.2]": a delta and its CI, each formatted with `spec`; "+0.12 (no CI)" when neither bound was
    computed (fewer items than an interval needs). Printed through rich it must be escaped: rich takes "[…]" for a
    style tag and drops it."""
    if _missing(low) and _missing(high):
        return f"{delta:{spec}}{sep}(no CI)"
    return f"{delta:{spec}}{sep}[{low:{spec}}, {high:{spec}}]"


def cell_key(row: ResultRow) -> tuple[str, str, int | None]:
    return row.cell


def cell_label(cell: tuple[str, str, int | None]) -> str:
    """"detox / dpo" for a row pooled over seeds, "detox / dpo / 1" for one seed's."""
    return " / ".join(str(x) for x in cell if x is not None)


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
            text = (f"{b.label} {num(r.baseline)} → {num(r.value)} (Δ {num(r.delta, signed=True)} "
                    f"{ci(r.delta_ci_low, r.delta_ci_high, signed=True)})")
            (better if r.verdict == Verdict.IMPROVED else worse).append(text)
        who = f"{method} on {context}" + (f" (seed {seed})" if seed is not None and len({k[2] for k in map(cell_key, rows)}) > 1 else "")
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


def against_placebo(rows: list[ResultRow]) -> list[ResultRow]:
    """The rows that have a placebo, with their change against it in the delta and verdict fields: the matrix and
    the sentences then read "what the preference signal did beyond training on the same data without it"."""
    def nan(x: float | None) -> float:
        return math.nan if x is None else x

    return [r.model_copy(update={"delta": nan(r.delta_vs_placebo), "delta_ci_low": nan(r.delta_vs_placebo_ci_low),
                                 "delta_ci_high": nan(r.delta_vs_placebo_ci_high), "q_value": r.q_vs_placebo,
                                 "verdict": r.verdict_vs_placebo or Verdict.UNCLEAR})
            for r in rows if r.placebo is not None]


def matrix_title(rows: list[ResultRow], against: str = "baseline", *, coloured: bool = True) -> str:
    seeds = max((r.seeds for r in rows), default=1)
    pooled = f"pooled over {seeds} training seeds" if seeds > 1 else "one training seed"
    return (f"What moved (Δ vs {against}, 95% CI over items, {pooled}; "
            f"{'coloured' if coloured else 'improved or harmed'} when the CI excludes 0 and q ≤ 0.05 across the run)")


@dataclass(frozen=True)
class MatrixEntry:
    """One number of the matrix: a cell's change in one headline behaviour, against the baseline or its placebo
    (`baseline` and `value` are always the untrained model's and the cell's own)."""

    against: str  # "baseline" or "placebo"
    context: str
    method: str
    seed: int | None
    behaviour: str  # the behaviour's label
    probe: str
    metric: str
    baseline: float | None
    value: float | None
    delta: float | None
    delta_ci_low: float | None
    delta_ci_high: float | None
    verdict: Verdict
    q_value: float | None
    n: int | None
    mde: float | None


MATRIX_COLUMNS = [f.name for f in fields(MatrixEntry)]


def _columns(rows: list[ResultRow]) -> list[tuple[Behaviour, str]]:
    """The matrix's behaviours, each with the metric it reads (per-turn metrics at the last turn run)."""
    return [(b, last_turn(rows, b.probe, b.metric)) for b in behaviours(rows)]


def matrix_entries(rows: list[ResultRow], against: str = "baseline") -> list[MatrixEntry]:
    """The matrix as a list, cell by cell in the rows' order, behaviours in registry order; a cell's behaviour
    that was not measured is left out.

    against: "placebo" gives each real cell's change against its placebo (rows without one are left out)."""
    if against == "placebo":
        rows = against_placebo(rows)
    by = index_rows(rows)
    columns = _columns(rows)
    out = []
    for cell in dict.fromkeys(cell_key(r) for r in rows):
        for b, metric in columns:
            r = by.get((*cell, b.probe, metric))
            if r is not None:
                out.append(MatrixEntry(
                    against=against, context=r.context, method=r.method, seed=r.seed, behaviour=b.label,
                    probe=r.probe, metric=r.metric, baseline=r.baseline, value=r.value, delta=r.delta,
                    delta_ci_low=r.delta_ci_low, delta_ci_high=r.delta_ci_high, verdict=r.verdict, q_value=r.q_value,
                    n=r.n, mde=r.mde))
    return out


_COLOURS = {Verdict.IMPROVED: "green", Verdict.HARMED: "red", Verdict.UNCLEAR: "white"}


def _num(x: float | None, spec: str = ".3g") -> str:
    """A number for reading; NaN prints as "nan" (a change that could not be computed), None as "—"."""
    return "—" if x is None else f"{x:{spec}}"


def _entry_delta(e: MatrixEntry, sep: str = " ") -> str:
    nan = math.nan
    return _delta_ci(*(nan if x is None else x for x in (e.delta, e.delta_ci_low, e.delta_ci_high)), "+.3f", sep=sep)


def _matrix_table(console, rows: list[ResultRow], entries: list[MatrixEntry], title: str):
    """Cells x behaviours, delta over its [CI], coloured by verdict; None when the console cannot hold it whole."""
    from rich.text import Text

    from dpolab.experiment.layout import fitted_table

    by = {(e.context, e.method, e.seed, e.probe, e.metric): e for e in entries}
    cells = list(dict.fromkeys((e.context, e.method, e.seed) for e in entries))
    columns = _columns(rows)
    headers = ["context / method" + (" / seed" if any(c[2] is not None for c in cells) else "")]
    headers += [f"{b.label}\n{b.probe} · {metric}" for b, metric in columns]

    def shown(e: MatrixEntry | None):
        return "—" if e is None else Text(_entry_delta(e, sep="\n"), style=_COLOURS[e.verdict])

    table_rows = [[cell_label(cell), *(shown(by.get((*cell, b.probe, metric))) for b, metric in columns)]
                  for cell in cells]
    return fitted_table(console, headers, table_rows, justify=["left"] + ["right"] * len(columns), title=title,
                        show_lines=True)


def _print_matrix_blocks(console, entries: list[MatrixEntry], title: str) -> None:
    """One block per cell, two lines per behaviour: its probe · metric (and label), then the numbers, aligned."""
    from rich.text import Text

    from dpolab.experiment.layout import indented

    console.print(Text(title, style="italic"))
    for cell in dict.fromkeys((e.context, e.method, e.seed) for e in entries):
        group = [e for e in entries if (e.context, e.method, e.seed) == cell]
        moved = [f"{_num(e.baseline)} → {_num(e.value)}" if e.against == "baseline" else "" for e in group]
        deltas = [_entry_delta(e) for e in group]
        widths = [max(len(x) for x in column) for column in (moved, deltas, [e.verdict.value for e in group])]
        console.print()
        console.print(Text(cell_label(cell), style="bold"))
        for e, m, d in zip(group, moved, deltas):
            indented(console, Text.assemble((f"{e.probe} · {e.metric}", "bold"), (f" — {e.behaviour}", "dim")), 2)
            colour = _COLOURS[e.verdict]
            q = "" if e.q_value is None else f"q={_num(e.q_value, '.2g')} "
            numbers = Text.assemble(f"{m:<{widths[0]}}  " if m else "", "Δ ", (f"{d:<{widths[1]}}", colour), "  ",
                                    (f"{e.verdict.value:<{widths[2]}}", colour))
            counts = f"{q}n={_num(e.n, 'd')}"
            if 6 + len(numbers) + 2 + len(counts) <= console.width:  # q and n on the numbers' line if they fit
                numbers.append(f"  {counts}")
                counts = ""
            indented(console, numbers, 6)
            if counts:  # else on a line of their own, together, not one cut from the other by the wrap
                indented(console, counts, 6)


def print_matrix(rows: list[ResultRow], console=None, *, against: str = "baseline") -> None:
    """The improve/harm matrix, its sentences and the seed findings on the terminal. A terminal wide enough gets
    cells x behaviours, delta [CI], coloured by verdict; a narrower one, a pipe or a file gets the same numbers as
    one block per cell, so no context, method, probe or metric name is ever cut.

    against: "placebo" shows each real cell's change against its placebo (rows without one are left out)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    entries = matrix_entries(rows, against)
    if against == "placebo":
        rows = against_placebo(rows)
        if not rows:
            return
    title = matrix_title(rows, against)
    table = _matrix_table(console, rows, entries, title)
    if table is not None:
        console.print(table)
    else:
        _print_matrix_blocks(console, entries, title)
        console.print()
    for s in headlines(rows):
        console.print("• " + escape(s))
    if against == "placebo":
        return
    found = seed_findings(rows)
    if found:
        marks = {"reproduced": "[green]reproduced[/]", "refuted": "[red]refuted[/]", "not shown": "not shown"}
        console.print("Seed findings:")
        for f in found:
            console.print(f"  {marks[f['status']]}: " + escape(_finding_text(f)))


def _finding_text(f: dict[str, Any]) -> str:
    return (f"{f['claim']} ({f['method']}; {f['metric']} {f['baseline']:.3g} → {f['value']:.3g}, "
            f"Δ {_delta_ci(f['delta'], f['delta_ci_low'], f['delta_ci_high'])}, n {f['n']}, MDE {_fmt(f['mde'])})")


def summary_markdown(rows: list[ResultRow]) -> str:
    """The run summary as markdown: the matrix against the baseline (and the placebo) as GitHub tables with full
    names, one line per cell and behaviour, each followed by its sentences; then the seed findings."""
    from dpolab.experiment.layout import to_markdown

    parts = []
    for against in ("baseline", "placebo"):
        entries = matrix_entries(rows, against)
        if not entries:
            continue
        shown = against_placebo(rows) if against == "placebo" else rows
        seeded = any(e.seed is not None for e in entries)
        headers = ["context", "method"] + (["seed"] if seeded else []) + [
            "behaviour", "probe", "metric", "baseline → value", f"Δ vs {against} [95% CI]", "verdict", "q", "n"]
        table = [[e.context, e.method] + ([e.seed] if seeded else []) + [
            e.behaviour, e.probe, e.metric, f"{_num(e.baseline)} → {_num(e.value)}", _entry_delta(e),
            e.verdict, _num(e.q_value, ".2g") if e.q_value is not None else None, e.n] for e in entries]
        parts.append(f"### {matrix_title(shown, against, coloured=False)}\n\n{to_markdown(headers, table)}")
        sentences = headlines(shown)
        if sentences:
            parts.append("\n".join(f"- {s}" for s in sentences))
    found = seed_findings(rows)
    if found:
        headers = ["status", "context", "method", "claim", "metric", "baseline → value", "Δ [95% CI]", "q", "n",
                   "MDE", "source"]
        table = [[f["status"], f["context"], f["method"], f["claim"], f["metric"],
                  f"{_num(f['baseline'])} → {_num(f['value'])}",
                  _delta_ci(f["delta"], f["delta_ci_low"], f["delta_ci_high"]),
                  None if f["q_value"] is None else _num(f["q_value"], ".2g"), f["n"], _fmt(f["mde"]), f["source"]]
                 for f in found]
        parts.append(f"### Seed findings\n\n{to_markdown(headers, table)}")
    return "\n\n".join(parts)


def print_summary(rows: list[ResultRow], console=None, *, fmt: Format = Format.TABLE) -> None:
    """What `dpolab run` prints at its end and `dpolab show` prints again: the matrix against the baseline and
    against the placebo, the sentences and the seed findings (table); or the matrix as markdown, csv or json
    (one object per cell, behaviour and comparison, the `against` field saying which)."""
    from rich.console import Console

    from dpolab.experiment.layout import emit, to_csv, to_json

    console = console or Console()
    fmt = Format(fmt)
    if fmt == Format.TABLE:
        print_matrix(rows, console)
        print_matrix(rows, console, against="placebo")
        return
    if fmt == Format.MARKDOWN:
        emit(console, summary_markdown(rows))
        return
    records = [asdict(e) for e in matrix_entries(rows) + matrix_entries(rows, "placebo")]
    emit(console, to_csv(records, MATRIX_COLUMNS) if fmt == Format.CSV else to_json(records))


COMPARE_COLUMNS = ["context", "method", "seed", "probe", "metric", "a_value", "a_ci_low", "a_ci_high", "a_verdict",
                   "b_value", "b_ci_low", "b_ci_high", "b_verdict", "differs"]
_DIFFERS = {"verdict": "verdict differs", "value": "value differs"}  # what a block says; "only in A/B" as it is


def compare_record(d: dict[str, Any]) -> dict[str, Any]:
    """One difference of compare_runs as a flat row (COMPARE_COLUMNS): its key, each run's value, CI and verdict."""
    context, method, seed, probe, metric = d["key"]
    out = {"context": context, "method": method, "seed": seed, "probe": probe, "metric": metric}
    for side in ("a", "b"):
        r = d[side]
        out |= {f"{side}_{k}": None if r is None else getattr(r, k) for k in ("value", "ci_low", "ci_high", "verdict")}
    return out | {"differs": d["why"]}


def _value_ci(r: ResultRow | None) -> str:
    if r is None:
        return "—"
    if all(x is None or math.isnan(x) for x in (r.ci_low, r.ci_high)):  # as the run summary says it
        return f"{_num(r.value, '.3f')} (no CI)"
    return f"{_num(r.value, '.3f')} [{_num(r.ci_low, '.3f')}, {_num(r.ci_high, '.3f')}]"


def _verdict(r: ResultRow | None) -> str:
    return "—" if r is None else r.verdict.value


def _print_compare(console, diffs: list[dict[str, Any]], dir_a, dir_b, *, show_all: bool = False) -> None:
    """A table where the console holds it whole; otherwise one block per cell, each metric with A and B below it.
    A cell only one run has is one line saying so (every metric of it with show_all)."""
    from rich.text import Text

    if not diffs:
        console.print("no differences")
        return
    whys: dict[tuple, list[str]] = {}
    for d in diffs:
        whys.setdefault(d["key"][:3], []).append(d["why"])
    alone = {cell: w for cell, w in whys.items() if not show_all and len(set(w)) == 1 and w[0].startswith("only in")}
    diffs = [d for d in diffs if d["key"][:3] not in alone]
    if diffs:
        _print_compare_rows(console, diffs, dir_a, dir_b)
    else:
        console.print(Text(f"A = {dir_a}\nB = {dir_b}", style="italic"))
    if alone:
        console.print()
    for cell, w in alone.items():
        console.print(Text.assemble((cell_label(cell), "bold"), f": {w[0]} ({len(w)} metrics; --all lists them)"))


def _print_compare_rows(console, diffs: list[dict[str, Any]], dir_a, dir_b) -> None:
    """The differing rows: a table where the console holds it whole, else a block per cell."""
    from rich.text import Text

    from dpolab.experiment.layout import fitted_table, indented

    headers = ["context / method / seed", "probe", "metric", "A value [CI]", "A verdict", "B value [CI]", "B verdict",
               "differs in"]
    table = fitted_table(console, headers, [[cell_label(d["key"][:3]), *d["key"][3:], _value_ci(d["a"]),
                                             _verdict(d["a"]), _value_ci(d["b"]), _verdict(d["b"]), d["why"]]
                                            for d in diffs], title=f"A = {dir_a}   B = {dir_b}")
    if table is not None:
        console.print(table)
        return
    console.print(Text(f"A = {dir_a}\nB = {dir_b}", style="italic"))
    for cell in dict.fromkeys(d["key"][:3] for d in diffs):
        console.print()
        console.print(Text(cell_label(cell), style="bold"))
        for d in (d for d in diffs if d["key"][:3] == cell):
            why = _DIFFERS.get(d["why"], d["why"])
            indented(console, Text.assemble((" · ".join(d["key"][3:]), "bold"), f"  ({why})" if why else ""), 2)
            width = max(len(_value_ci(d[side])) for side in ("a", "b"))
            for side in ("a", "b"):
                r = d[side]
                colour = "white" if r is None else _COLOURS[r.verdict]
                indented(console, Text.assemble(f"{side.upper()}  ", f"{_value_ci(r):<{width}}", "  ",
                                                (_verdict(r), colour)), 6)


def compare_runs(dir_a: str | Path, dir_b: str | Path, *, show_all: bool = False, console=None,
                 fmt: Format = Format.TABLE) -> list[dict[str, Any]]:
    """Rows whose verdict differs, whose value moved beyond both CIs, or that exist in only one run; printed as
    `fmt` (table: a table where the console holds it whole, one block per cell otherwise)."""
    from rich.console import Console

    from dpolab.experiment.layout import emit, to_csv, to_json, to_markdown
    from dpolab.experiment.results import read_run

    console = console or Console()
    a, b = (index_rows(read_run(d)) for d in (dir_a, dir_b))
    diffs = []
    for key in sorted(set(a) | set(b), key=str):
        ra, rb = a.get(key), b.get(key)
        if ra is None or rb is None:
            diffs.append({"key": key, "a": ra, "b": rb, "why": "only in " + ("B" if ra is None else "A")})
            continue
        apart = rb.value > ra.ci_high or rb.value < ra.ci_low
        if ra.verdict != rb.verdict or apart or show_all:
            diffs.append({"key": key, "a": ra, "b": rb, "why": "verdict" if ra.verdict != rb.verdict else "value" if apart else ""})
    fmt = Format(fmt)
    if fmt == Format.TABLE:
        _print_compare(console, diffs, dir_a, dir_b, show_all=show_all)
    elif fmt == Format.MARKDOWN:
        headers = ["context", "method", "seed", "probe", "metric", "A value [95% CI]", "A verdict", "B value [95% CI]",
                   "B verdict", "differs in"]
        table = [[*d["key"], _value_ci(d["a"]), _verdict(d["a"]), _value_ci(d["b"]), _verdict(d["b"]), d["why"]]
                 for d in diffs]
        emit(console, f"A = `{dir_a}`, B = `{dir_b}`\n\n" + to_markdown(headers, table))
    else:
        records = [compare_record(d) for d in diffs]
        emit(console, to_csv(records, COMPARE_COLUMNS) if fmt == Format.CSV else to_json(records))
    return diffs
