"""Results: each cell's metrics against the baseline (paired bootstrap deltas over items), then each (context,
method) pooled over its training seeds, against the baseline and against its placebo, with q-values across the
run, the minimum detectable effect, and verdicts.

Two tables: results_by_seed.parquet holds one row per cell (context, method, seed) and metric, as each cell wrote
it when it finished (rows.json); results.parquet holds the run's claims, one row per (context, method) and metric
pooled over seeds (`seed` is empty, `seeds` says how many).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from dpolab import stats
from dpolab.probes.summary import EvalSummary
from dpolab.stats import Verdict


class ResultRow(BaseModel):
    """One row of results.parquet: a cell's (context, method, seed) value of one probe metric, the baseline's, the
    paired change between them over items with its 95% CI, and the verdict it gives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    context: str
    method: str
    seed: int | None  # the training seed; empty in a row pooled over seeds
    probe: str
    metric: str
    value: float | None  # the trained cell's value, with its 95% CI
    ci_low: float | None
    ci_high: float | None
    n: int | None  # items behind the delta: those where both models define the metric (paired)
    baseline: float | None  # the untrained model's value, with its 95% CI
    baseline_ci_low: float | None
    baseline_ci_high: float | None
    delta: float | None  # cell - baseline, paired over items, with its bootstrap 95% CI
    delta_ci_low: float | None
    delta_ci_high: float | None
    higher_is_better: bool | None
    verdict: Verdict  # per seed: the CI alone; pooled: the CI and the q-value (stats.verdict)
    p_value: float | None = None  # two-sided, of "no change"
    seeds: int = 1  # training seeds behind the row: 1 for a cell's own row
    seed_deltas: list[float] | None = None  # pooled rows: each seed's own delta, in seed order
    q_value: float | None = None  # pooled rows: Benjamini-Hochberg across the run's rows of the same family
    family: str | None = None  # "headline" (the matrix's behaviours) or "detail"; q-values are per family
    mde: float | None = None  # minimum detectable effect at 80% power and these sizes (stats.mde)
    placebo: str | None = None  # the placebo context this row's real context is also compared with
    delta_vs_placebo: float | None = None  # cell - placebo, paired over items and matched by seed
    delta_vs_placebo_ci_low: float | None = None
    delta_vs_placebo_ci_high: float | None = None
    q_vs_placebo: float | None = None
    verdict_vs_placebo: Verdict | None = None

    @property
    def cell(self) -> tuple[str, str, int | None]:
        return self.context, self.method, self.seed

    @property
    def is_placebo(self) -> bool:
        from dpolab.contexts.placebo import parse_placebo

        return parse_placebo(self.context) is not None

    def record(self) -> dict[str, Any]:
        """The row as plain values (verdicts as their strings), as results.parquet, results.csv and rows.json
        hold it; NaN stays NaN."""
        verdicts = {k: getattr(self, k).value for k in ("verdict", "verdict_vs_placebo") if getattr(self, k) is not None}
        return {**self.model_dump(), **verdicts}


COLUMNS = list(ResultRow.model_fields)
_ARROW = {str: pa.string(), int: pa.int64(), bool: pa.bool_(), float: pa.float64(), Verdict: pa.string()}


def _arrow_type(annotation) -> pa.DataType:
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":  # X | None
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is list:
        return pa.list_(_ARROW[get_args(annotation)[0]])
    return _ARROW[annotation]


SCHEMA = pa.schema([(name, _arrow_type(f.annotation)) for name, f in ResultRow.model_fields.items()])


def per_item_values(eval_dir: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(probe, metric) -> {item_id: value} from an eval folder's <probe>_items.parquet files."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for path in sorted(Path(eval_dir).glob("*_items.parquet")):
        probe = path.name[: -len("_items.parquet")]
        table = pq.read_table(path).to_pylist()
        for row in table:
            out.setdefault((probe, row["metric"]), {})[str(row["item_id"])] = float("nan") if row["value"] is None else float(row["value"])
    return out


def compare(baseline: EvalSummary, cell: EvalSummary, baseline_items: dict, cell_items: dict, *, context: str,
            method: str, seed: int, n_boot: int) -> list[ResultRow]:
    """One row per (probe, metric) present in both summaries: values, CIs, paired delta and verdict.

    seed: the cell's training seed, which also seeds the bootstrap of its deltas.
    """
    rows = []
    for probe, result in cell.probes.items():
        for metric, m in result.metrics.items():
            b = baseline.metric(probe, metric)
            if b is None:
                continue
            pair = stats.align(baseline_items.get((probe, metric), {}), cell_items.get((probe, metric), {}))
            d = stats.paired_bootstrap_delta(pair.a, pair.b, seed=seed, n_boot=n_boot, statistic=m.aggregate)
            p = None if math.isnan(d.p) else d.p
            rows.append(ResultRow(
                context=context, method=method, seed=seed, probe=probe, metric=metric, value=m.number("value"),
                ci_low=m.number("ci_low"), ci_high=m.number("ci_high"), n=d.n, baseline=b.number("value"),
                baseline_ci_low=b.number("ci_low"), baseline_ci_high=b.number("ci_high"),
                delta=d.value, delta_ci_low=d.ci_low, delta_ci_high=d.ci_high,
                higher_is_better=m.higher_is_better, verdict=stats.verdict(d.ci_low, d.ci_high, m.higher_is_better),
                p_value=p,
            ))
    return rows


def write_results(rows: list[ResultRow], path: Path) -> None:
    """results.parquet, written atomically; also results.csv beside it."""
    import csv

    from dpolab.io import atomic_write

    records = [r.record() for r in rows]
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)

    atomic_write(path.with_suffix(".csv"), write_csv)


def read_results(path: Path) -> list[ResultRow]:
    """The rows of a results.parquet (a bad file raises pydantic's ValidationError naming the field)."""
    return [ResultRow.model_validate(r) for r in pq.read_table(path).to_pylist()]


def read_rows_json(path: Path) -> list[ResultRow]:
    """A cell's rows.json (its rows, written as soon as the cell is evaluated)."""
    return [ResultRow.model_validate(r) for r in json.loads(Path(path).read_text(encoding="utf-8"))]


def read_run(run_dir: str | Path) -> list[ResultRow]:
    """A finished run's pooled rows (its results.parquet); a clear ConfigError, naming the path, for a folder that
    is not a run, a run that has not finished, or a results file that cannot be read."""
    from pydantic import ValidationError

    from dpolab.errors import ConfigError

    run_dir = Path(run_dir)
    path = run_dir / "results.parquet"
    if not path.exists():
        if (run_dir / "experiment.json").exists():
            raise ConfigError(f"{run_dir} has no results yet ({path} does not exist): the run has not finished; "
                              f"continue it with `dpolab run SPEC --out {run_dir} --resume`")
        what = "does not exist" if not run_dir.exists() else "is not a `dpolab run` folder (no results.parquet)"
        raise ConfigError(f"{run_dir} {what}")
    try:
        return read_results(path)
    except (pa.ArrowException, ValidationError) as exc:
        raise ConfigError(f"{path} cannot be read as a run's results: {exc}") from None
