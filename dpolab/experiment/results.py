"""Results: each cell's metrics against the baseline, paired bootstrap deltas over items, and verdicts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dpolab import stats
from dpolab.probes.summary import EvalSummary

COLUMNS = ["context", "method", "seed", "probe", "metric", "value", "ci_low", "ci_high", "n", "baseline",
           "baseline_ci_low", "baseline_ci_high", "delta", "delta_ci_low", "delta_ci_high", "higher_is_better", "verdict"]


def per_item_values(eval_dir: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(probe, metric) -> {item_id: value} from an eval folder's <probe>_items.parquet files."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for path in sorted(Path(eval_dir).glob("*_items.parquet")):
        probe = path.name[: -len("_items.parquet")]
        table = pq.read_table(path).to_pylist()
        for row in table:
            out.setdefault((probe, row["metric"]), {})[str(row["item_id"])] = float("nan") if row["value"] is None else float(row["value"])
    return out


def compare(baseline: EvalSummary, cell: EvalSummary, baseline_items: dict, cell_items: dict, *, seed: int,
            n_boot: int) -> list[dict[str, Any]]:
    """One row per (probe, metric) present in both summaries: values, CIs, paired delta and verdict."""
    rows = []
    for probe, result in cell.probes.items():
        for metric, m in result.metrics.items():
            b = baseline.metric(probe, metric)
            if b is None:
                continue
            pair = stats.align(baseline_items.get((probe, metric), {}), cell_items.get((probe, metric), {}))
            d = stats.paired_bootstrap_delta(pair.a, pair.b, seed=seed, n_boot=n_boot, statistic=m.aggregate)
            rows.append({
                "probe": probe, "metric": metric, "value": m.number("value"), "ci_low": m.number("ci_low"),
                "ci_high": m.number("ci_high"), "n": m.n, "baseline": b.number("value"),
                "baseline_ci_low": b.number("ci_low"), "baseline_ci_high": b.number("ci_high"),
                "delta": d.value, "delta_ci_low": d.ci_low, "delta_ci_high": d.ci_high,
                "higher_is_better": m.higher_is_better, "verdict": stats.verdict(d.ci_low, d.ci_high, m.higher_is_better).value,
            })
    return rows


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    """results.parquet, written atomically; also results.csv beside it."""
    import csv

    from dpolab.io import atomic_write

    records = [{c: r.get(c) for c in COLUMNS} for r in rows]
    table = pa.Table.from_pylist(records, schema=pa.schema([(c, _TYPES.get(c, pa.float64())) for c in COLUMNS]))
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(records)

    atomic_write(path.with_suffix(".csv"), write_csv)


_TYPES = {"context": pa.string(), "method": pa.string(), "seed": pa.int64(), "probe": pa.string(), "metric": pa.string(),
          "n": pa.int64(), "higher_is_better": pa.bool_(), "verdict": pa.string()}


def read_results(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()
