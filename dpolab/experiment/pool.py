"""The run's claims: each (context, method) pooled over its training seeds, against the baseline and against its
placebo, with the minimum detectable effect, q-values across the run, and verdicts.

Every cell wrote its own rows (against the baseline, one seed) when it finished; this reads the cells' per-item
values back and pools them (dpolab.stats.seed_pooled_delta), so it can be rerun on a finished or resumed run.

Multiple comparisons: Benjamini–Hochberg within two families, separately for the comparisons with the baseline and
with the placebo. "headline" holds the matrix's behaviours (each probe's headline metrics at the last turn run)
of every real (context, method): the claims the report makes. "detail" holds every other metric (breakdowns by
technique or domain, variants). Keeping the breakdowns out of the headline family stops a hundred correlated
sub-metrics from diluting the few claims a reader acts on; the detail family still gets its own q-values.
Placebo cells are controls, not claims: their rows are pooled against the baseline but take no part in either
family.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from dpolab import stats
from dpolab.banks import stable_hash
from dpolab.contexts.placebo import parse_placebo, placebo_name
from dpolab.experiment.results import ResultRow
from dpolab.probes.summary import EvalSummary

Items = dict[tuple[str, str], dict[str, float]]  # (probe, metric) -> {item_id: value}


@dataclass
class CellEval:
    """One finished cell's eval: its summary and per-item values."""

    summary: EvalSummary
    items: Items


def placebo_for(context: str, method: str, groups: set[tuple[str, str]]) -> tuple[str, str] | None:
    """The placebo group a real (context, method) is compared with: the shuffled pairs trained with the same
    method (it differs from the real cell only in the preference signal), else self-SFT on the same prompts."""
    if parse_placebo(context) is not None:
        return None
    shuffled = (placebo_name("shuffled", context), method)
    if shuffled in groups:
        return shuffled
    return next((g for g in sorted(groups) if g[0] == placebo_name("self-sft", context)), None)


def _vectors(ids: list[str], maps: list[dict[str, float]]) -> list[list[float]]:
    return [[m.get(i, math.nan) for i in ids] for m in maps]


def _number(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def pool(baseline: EvalSummary, baseline_items: Items, cells: dict[tuple[str, str, int], CellEval], *,
         headline_metrics: set[tuple[str, str]], n_boot: int) -> list[ResultRow]:
    """One row per (context, method) and metric, pooled over the seeds it ran; q-values and verdicts set.

    cells: (context, method, seed) -> its eval; placebo cells are named like "shuffled:detox".
    headline_metrics: the (probe, metric) pairs of the headline family.
    """
    groups: dict[tuple[str, str], dict[int, CellEval]] = defaultdict(dict)
    for (context, method, seed), ev in cells.items():
        groups[(context, method)][seed] = ev
    rows: list[ResultRow] = []
    for (context, method), by_seed in groups.items():
        seeds = sorted(by_seed)
        first = by_seed[seeds[0]].summary
        control = placebo_for(context, method, set(groups))
        control_seeds = [s for s in seeds if control and s in groups[control]]
        for probe, result in first.probes.items():
            for metric, m in result.metrics.items():
                b = baseline.metric(probe, metric)
                if b is None:
                    continue
                key = (probe, metric)
                ids = sorted(set(baseline_items.get(key, {})).union(*(by_seed[s].items.get(key, {}) for s in seeds)))
                base = _vectors(ids, [baseline_items.get(key, {})])[0]
                cell = _vectors(ids, [by_seed[s].items.get(key, {}) for s in seeds])
                boot = stable_hash(context, method, probe, metric)
                delta = stats.seed_pooled_delta(base, cell, seed=boot, n_boot=n_boot, statistic=m.aggregate)
                value = stats.seed_pooled_delta(None, cell, seed=boot, n_boot=n_boot, statistic=m.aggregate)
                seed_sd = float(_sd(delta.seed_deltas))
                mde = stats.mde(base, seed=boot, n_boot=n_boot, statistic=m.aggregate, seed_sd=seed_sd,
                                n_seeds=len(seeds))
                vs = {}
                if control_seeds:
                    mine = [cell[seeds.index(s)] for s in control_seeds]
                    theirs = _vectors(ids, [groups[control][s].items.get(key, {}) for s in control_seeds])
                    d = stats.seed_pooled_delta(theirs, mine, seed=boot + 1, n_boot=n_boot, statistic=m.aggregate)
                    vs = {"placebo": control[0], "delta_vs_placebo": _number(d.interval.value),
                          "delta_vs_placebo_ci_low": _number(d.interval.ci_low),
                          "delta_vs_placebo_ci_high": _number(d.interval.ci_high), "_p_placebo": d.interval.p}
                iv = delta.interval
                rows.append({
                    "context": context, "method": method, "seed": None, "probe": probe, "metric": metric,
                    "value": value.interval.value, "ci_low": value.interval.ci_low, "ci_high": value.interval.ci_high,
                    "n": iv.n, "baseline": b.number("value"), "baseline_ci_low": b.number("ci_low"),
                    "baseline_ci_high": b.number("ci_high"), "delta": iv.value, "delta_ci_low": iv.ci_low,
                    "delta_ci_high": iv.ci_high, "higher_is_better": m.higher_is_better, "p_value": _number(iv.p),
                    "seeds": len(seeds), "seed_deltas": [float(x) for x in delta.seed_deltas], "mde": _number(mde),
                    "family": None if parse_placebo(context) else "headline" if key in headline_metrics else "detail",
                    **vs,
                })
    _adjust(rows)
    return [ResultRow(**{k: v for k, v in r.items() if not k.startswith("_")}) for r in rows]


def _sd(xs: tuple[float, ...]) -> float:
    """The spread of the seeds' deltas (sample standard deviation over the defined ones; 0 below two)."""
    clean = [x for x in xs if not math.isnan(x)]
    return statistics.stdev(clean) if len(clean) >= 2 else 0.0


def _adjust(rows: list[dict]) -> None:
    """q-values within each family, per comparison; then the verdicts that use them."""
    for family in ("headline", "detail"):
        members = [r for r in rows if r["family"] == family]
        for q, r in zip(stats.q_values([_nan(r["p_value"]) for r in members]), members):
            r["q_value"] = _number(q)
        placebo = [r for r in members if "_p_placebo" in r]
        for q, r in zip(stats.q_values([r["_p_placebo"] for r in placebo]), placebo):
            r["q_vs_placebo"] = _number(q)
    for r in rows:
        r["verdict"] = stats.verdict(r["delta_ci_low"], r["delta_ci_high"], r["higher_is_better"],
                                     q=_nan(r.get("q_value")) if r["family"] else None)
        if "_p_placebo" in r:
            r["verdict_vs_placebo"] = stats.verdict(_nan(r["delta_vs_placebo_ci_low"]), _nan(r["delta_vs_placebo_ci_high"]),
                                                    r["higher_is_better"], q=_nan(r.get("q_vs_placebo")))


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def pool_run(out: Path, cells: list[tuple[str, str, int]], *, n_boot: int, seed_rows: list[ResultRow]) -> list[ResultRow]:
    """pool() over a run folder's finished cells (those with a cell.json), reading their evals from disk."""
    from dpolab.experiment.results import per_item_values
    from dpolab.experiment.runner import cell_name
    from dpolab.experiment.summary import behaviours, last_turn

    base_dir = Path(out) / "baseline"
    found = {}
    for c in cells:
        cell_dir = Path(out) / "cells" / cell_name(*c)
        if (cell_dir / "cell.json").exists():
            found[c] = CellEval(EvalSummary.read(cell_dir / "eval" / "summary.json"), per_item_values(cell_dir / "eval"))
    headline = {(b.probe, last_turn(seed_rows, b.probe, b.metric)) for b in behaviours(seed_rows)}
    return pool(EvalSummary.read(base_dir / "summary.json"), per_item_values(base_dir), found,
                headline_metrics=headline, n_boot=n_boot)
