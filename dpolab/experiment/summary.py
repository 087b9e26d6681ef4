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
    """"+0.12 [+0.03, +0.2]": a delta and its CI, each formatted with `spec`. Printed through rich it must be
    escaped: rich takes "[nan, nan]" for a style tag and drops it."""
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
            text = f"{b.label} {r.baseline:.3g} → {r.value:.3g} (Δ {_delta_ci(r.delta, r.delta_ci_low, r.delta_ci_high)})"
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


def matrix_title(rows: list[ResultRow], against: str = "baseline") -> str:
    seeds = max((r.seeds for r in rows), default=1)
    pooled = f"pooled over {seeds} training seeds" if seeds > 1 else "one training seed"
    return (f"What moved (Δ vs {against}, 95% CI over items, {pooled}; "
            f"coloured when the CI excludes 0 and q ≤ 0.05 across the run)")


def print_matrix(rows: list[ResultRow], console=None, *, against: str = "baseline") -> None:
    """The improve/harm matrix on the terminal: cells x behaviours, delta [CI], coloured by verdict. A console too
    narrow for the matrix gets the same numbers as one line per cell and behaviour.

    against: "placebo" shows each real cell's change against its placebo (rows without one are left out)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    if against == "placebo":
        rows = against_placebo(rows)
        if not rows:
            return
    by = index_rows(rows)
    colours = {Verdict.IMPROVED: "green", Verdict.HARMED: "red", Verdict.UNCLEAR: "white"}
    cells = list(dict.fromkeys(cell_key(r) for r in rows))
    columns = behaviours(rows)
    metrics = [last_turn(rows, b.probe, b.metric) for b in columns]
    title = matrix_title(rows, against)
    if console.width >= 24 + 17 * len(columns):
        table = Table(title=title, show_lines=True)
        table.add_column("context / method" + (" / seed" if any(c[2] is not None for c in cells) else ""))
        for b in columns:
            table.add_column(b.label, justify="right")
        for cell in cells:
            entries = []
            for b, m in zip(columns, metrics):
                r = by.get((*cell, b.probe, m))
                entries.append("—" if r is None else
                               f"[{colours[r.verdict]}]" + escape(_delta_ci(r.delta, r.delta_ci_low, r.delta_ci_high, "+.3f", sep="\n")) + "[/]")
            table.add_row(cell_label(cell), *entries)
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
                table.add_row(cell_label(cell) if first else "", b.label,
                              f"{r.baseline:.3g} → {r.value:.3g}",
                              f"[{c}]{escape(_delta_ci(r.delta, r.delta_ci_low, r.delta_ci_high, '+.3f'))}[/]",
                              f"[{c}]{r.verdict}[/]")
                first = False
            table.add_section()
    console.print(table)
    for s in headlines(rows):
        console.print("• " + escape(s))
    if against == "placebo":
        return
    found = seed_findings(rows)
    if found:
        marks = {"reproduced": "[green]reproduced[/]", "refuted": "[red]refuted[/]", "not shown": "not shown"}
        console.print("Seed findings:")
        for f in found:
            console.print(f"  {marks[f['status']]}: " + escape(
                f"{f['claim']} ({f['method']}; {f['metric']} {f['baseline']:.3g} → {f['value']:.3g}, "
                f"Δ {_delta_ci(f['delta'], f['delta_ci_low'], f['delta_ci_high'])}, n {f['n']}, MDE {_fmt(f['mde'])})"))


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
        table.add_row(cell_label((context, method, seed)), probe, metric, *show(d["a"]), *show(d["b"]), d["why"])
    console.print(table if diffs else "no differences")
    return diffs
