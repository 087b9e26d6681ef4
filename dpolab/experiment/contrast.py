"""Two methods of one run against each other: is A better than B, item by item?

The run's matrix compares every cell with the baseline and its placebo; two cells' intervals against the
baseline can overlap while their paired difference does not (or the reverse), so "Curry-DPO vs single-pair DPO"
needs its own interval. A contrast takes two (context, method) groups of a finished run, matches them by training
seed and pairs them over the test items (every cell is evaluated on the same items), and pools the seeds as the
placebo comparison does (dpolab.stats.seed_pooled_delta: A − B, items bootstrapped jointly across seeds).

Multiple comparisons: Benjamini–Hochberg within the contrast, the headline behaviours (the matrix's) as one family
and every other metric as another, as dpolab.experiment.pool does for the run. The verdict reads "improved" when A
is better than B (by the metric's own direction), "harmed" when worse.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from dpolab import stats
from dpolab.banks import stable_hash
from dpolab.errors import ConfigError
from dpolab.experiment.layout import Format
from dpolab.stats import Verdict


@dataclass(frozen=True)
class ContrastRow:
    """A − B on one metric: each side's value (pooled over the shared seeds) and the paired change with its CI."""

    a: str  # "context/method"
    b: str
    probe: str
    metric: str
    family: str  # headline (a matrix behaviour) or detail
    value_a: float
    value_b: float
    delta: float  # A − B
    ci_low: float
    ci_high: float
    p_value: float | None
    q_value: float | None
    verdict: Verdict  # improved: A better than B
    higher_is_better: bool
    n: int  # items paired
    seeds: int  # training seeds both ran

    def record(self) -> dict:
        return {**asdict(self), "verdict": self.verdict.value}


CONTRAST_COLUMNS = [f.name for f in fields(ContrastRow)]


def parse_group(text: str) -> tuple[str, str]:
    """"detox/curry" -> ("detox", "curry"): a context and a method, as the run named them."""
    context, sep, method = text.rpartition("/")
    if not sep or not context or not method:
        raise ConfigError(f"name a method of the run as CONTEXT/METHOD (e.g. detox/dpo), got {text!r}")
    return context, method


def _cells(run: Path) -> dict[tuple[str, str], dict[int, Path]]:
    """(context, method) -> {seed: cell folder} for the run's finished cells (those with a cell.json)."""
    found: dict[tuple[str, str], dict[int, Path]] = defaultdict(dict)
    for cell_json in sorted((run / "cells").glob("*/cell.json")):
        record = json.loads(cell_json.read_text())
        found[(record["context"], record["method"])][int(record["seed"])] = cell_json.parent
    return found


def contrast(run_dir: str | Path, a: str, b: str, *, n_boot: int | None = None) -> list[ContrastRow]:
    """A − B for every metric both groups measured, over the training seeds both ran: of a finished run, or of the
    finished cells of one still going.

    a, b: "context/method" of the run (a placebo's context is named as in its cells, e.g. shuffled:detox).
    n_boot: bootstrap resamples; default the run's own (spec.resolved.yaml's n_boot).
    """
    import yaml

    from dpolab.experiment.pool import _vectors
    from dpolab.experiment.results import per_item_values, read_run
    from dpolab.experiment.summary import behaviours, last_turn
    from dpolab.probes.summary import EvalSummary

    run = Path(run_dir)
    # a run still going has no results yet, but its finished cells can be set side by side already
    rows = [] if (run / "experiment.json").exists() and not (run / "results.parquet").exists() else read_run(run)
    groups = _cells(run)
    sides = [parse_group(x) for x in (a, b)]
    if sides[0] == sides[1]:
        raise ConfigError(f"a contrast needs two different methods; both are {a!r}")
    for side, text in zip(sides, (a, b)):
        if side not in groups:
            ran = ", ".join(f"{c}/{m}" for c, m in sorted(groups)) or "none"
            raise ConfigError(f"{run}: no finished cell of {text!r}; the run has {ran}")
    seeds = sorted(set(groups[sides[0]]) & set(groups[sides[1]]))
    if not seeds:
        raise ConfigError(f"{run}: {a} ran seeds {sorted(groups[sides[0]])} and {b} ran {sorted(groups[sides[1]])}: "
                          "no training seed in common to pair them by")
    if n_boot is None:
        resolved = yaml.safe_load((run / "spec.resolved.yaml").read_text()) or {}
        n_boot = int(resolved.get("n_boot") or 2000)
    evals = [[(EvalSummary.read(groups[side][s] / "eval" / "summary.json"), per_item_values(groups[side][s] / "eval"))
              for s in seeds] for side in sides]
    headline = {(h.probe, last_turn(rows, h.probe, h.metric)) for h in behaviours(rows or None)}
    out: list[dict] = []
    for probe, result in evals[0][0][0].probes.items():
        for metric, m in result.metrics.items():
            if evals[1][0][0].metric(probe, metric) is None:
                continue
            key = (probe, metric)
            maps = [[items.get(key, {}) for _, items in side] for side in evals]
            ids = sorted(set().union(*maps[0], *maps[1]))
            va, vb = (_vectors(ids, side) for side in maps)
            boot = stable_hash("contrast", a, b, probe, metric)
            d = stats.seed_pooled_delta(vb, va, seed=boot, n_boot=n_boot, statistic=m.aggregate).interval
            value_a = stats.seed_pooled_delta(None, va, seed=boot, n_boot=n_boot, statistic=m.aggregate).interval
            value_b = stats.seed_pooled_delta(None, vb, seed=boot, n_boot=n_boot, statistic=m.aggregate).interval
            out.append({"a": a, "b": b, "probe": probe, "metric": metric,
                        "family": "headline" if key in headline else "detail", "value_a": value_a.value,
                        "value_b": value_b.value, "delta": d.value, "ci_low": d.ci_low, "ci_high": d.ci_high,
                        "p_value": None if math.isnan(d.p) else float(d.p), "higher_is_better": m.higher_is_better,
                        "n": d.n, "seeds": len(seeds)})
    for family in ("headline", "detail"):
        members = [r for r in out if r["family"] == family]
        for q, r in zip(stats.q_values([math.nan if r["p_value"] is None else r["p_value"] for r in members]), members):
            r["q_value"] = None if math.isnan(q) else float(q)
    return [ContrastRow(**r, verdict=stats.verdict(r["ci_low"], r["ci_high"], r["higher_is_better"],
                                                   q=math.nan if r["q_value"] is None else r["q_value"]))
            for r in out]


def print_contrast(found: list[ContrastRow], console=None, *, fmt: Format = Format.TABLE, show_all: bool = False) -> None:
    """The contrast as `dpolab contrast` prints it: the headline behaviours (every metric with show_all) as a
    table on a terminal wide enough, one block per metric otherwise; or the rows as markdown, csv or json."""
    from rich.console import Console
    from rich.text import Text

    from dpolab.experiment.layout import emit, fitted_table, indented, to_csv, to_json, to_markdown
    from dpolab.numbers import ci, num

    console = console or Console()
    fmt = Format(fmt)
    shown = [r for r in found if show_all or r.family == "headline"]
    if fmt in (Format.CSV, Format.JSON):
        records = [r.record() for r in shown]
        emit(console, to_csv(records, CONTRAST_COLUMNS) if fmt == Format.CSV else to_json(records))
        return
    if not found:
        console.print("no metric measured by both")
        return
    a, b = found[0].a, found[0].b
    headers = ["probe · metric", a, b, f"{a} − {b} [95% CI]", "verdict", "q", "n"]
    table_rows = [[f"{r.probe} · {r.metric}", num(r.value_a), num(r.value_b),
                   f"{num(r.delta, signed=True)} {ci(r.ci_low, r.ci_high, signed=True) or '(no CI)'}",
                   r.verdict.value, num(r.q_value), num(r.n)] for r in shown]
    seeds = found[0].seeds
    title = (f"{a} − {b}: paired over items, {seeds} training seed{'s' if seeds != 1 else ''}; verdict 'improved' "
             f"when {a} is better (CI excludes 0 and q ≤ 0.05)")
    if fmt == Format.MARKDOWN:
        emit(console, f"**{title}**\n\n" + to_markdown(headers, table_rows))
        return
    table = fitted_table(console, headers, table_rows, justify=["left"] + ["right"] * 6, title=title)
    if table is not None:
        console.print(table)
        return
    console.print(Text(title, style="italic"))
    for row in table_rows:
        indented(console, Text(row[0], style="bold"), 2)
        indented(console, f"{a} {row[1]}  {b} {row[2]}", 6)
        indented(console, f"Δ {row[3]}  {row[4]}  q={row[5]} n={row[6]}", 6)
