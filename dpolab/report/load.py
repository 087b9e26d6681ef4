"""Reading an experiment folder (as `dpolab.experiment.runner` writes it) into one plain object for the report.

Every file is optional here: a report of a partial run (a cell killed mid-eval, no timings yet) still renders,
with the missing parts left blank rather than failing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from dpolab.experiment.results import ResultRow, read_results, read_rows_json
from dpolab.probes.summary import EvalSummary, MetricSummary, ProbeSummary

BASELINE = "baseline"


@dataclass(frozen=True)
class CellKey:
    context: str
    method: str
    seed: int

    @property
    def dirname(self) -> str:  # as dpolab.experiment.runner.cell_name
        return f"{self.context}__{self.method}__s{self.seed}"

    def label(self, *, with_seed: bool = True) -> str:
        return f"{self.context} / {self.method}" + (f" / s{self.seed}" if with_seed else "")


@dataclass
class Model:
    """The baseline or one trained cell: where its eval lives, its summary and (for cells) its training log."""

    name: str  # "baseline" or the cell folder name
    key: CellKey | None  # None for the baseline
    eval_dir: Path
    summary: EvalSummary | None
    train_metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, one dict per step
    cell_info: dict[str, Any] | None = None  # cell.json
    _records: dict[str, list[dict[str, Any]] | None] = field(default_factory=dict, repr=False)

    @property
    def is_baseline(self) -> bool:
        return self.key is None

    def metric(self, probe: str, metric: str) -> MetricSummary | None:
        """A metric from summary.json; None when the summary, the probe or the metric is absent."""
        return None if self.summary is None else self.summary.metric(probe, metric)

    def probe(self, probe: str) -> ProbeSummary | None:
        return None if self.summary is None else self.summary.probe(probe)

    def probe_info(self, probe: str) -> dict[str, Any]:
        found = self.probe(probe)
        return {} if found is None else found.info

    @property
    def probe_names(self) -> list[str]:
        return [] if self.summary is None else list(self.summary.probes)

    def explanations(self) -> dict[str, dict[str, Any]]:
        """behaviour -> explain.json of the cell's mechanism analyses (CELL/explain/<behaviour>/explain.json)."""
        found = {}
        for path in sorted((self.eval_dir.parent / "explain").glob("*/explain.json")):
            data = _read_json(path)
            if isinstance(data, dict):
                found[path.parent.name] = data
        return found

    def records(self, probe: str) -> list[dict[str, Any]] | None:
        """The raw per-item records of a probe (<probe>.parquet), read once; None when absent."""
        if probe not in self._records:
            path = self.eval_dir / f"{probe}.parquet"
            self._records[probe] = _read_parquet(path) if path.exists() else None
        return self._records[probe]


@dataclass
class Experiment:
    out: Path
    rows: list[ResultRow]  # results.parquet: the claims, each (context, method) pooled over its seeds
    baseline: Model
    cells: list[Model]  # in the order of results.parquet, then unfinished cells found on disk
    spec_text: str | None
    spec: dict[str, Any]
    environment: dict[str, Any] | None
    timings: dict[str, Any] | None
    seed_rows: list[ResultRow] = field(default_factory=list)  # results_by_seed.parquet: one cell's rows each

    @cached_property
    def several_seeds(self) -> bool:
        return len({c.key.seed for c in self.cells if c.key}) > 1

    @property
    def models(self) -> list[Model]:
        return [self.baseline, *self.cells]

    def label(self, m: Model) -> str:
        return BASELINE if m.key is None else m.key.label(with_seed=self.several_seeds)

    @cached_property
    def model_name(self) -> str:
        return str(self.spec.get("model") or (self.baseline.summary.model if self.baseline.summary else None) or "unknown model")

    @cached_property
    def contexts(self) -> list[str]:
        return list(dict.fromkeys(c.key.context for c in self.cells if c.key))

    @cached_property
    def by_row(self) -> dict[tuple, ResultRow]:
        return {(r.context, r.method, r.seed, r.probe, r.metric): r for r in self.seed_rows}

    def row(self, key: CellKey, probe: str, metric: str) -> ResultRow | None:
        """One cell's (one seed's) row."""
        return self.by_row.get((key.context, key.method, key.seed, probe, metric))

    @cached_property
    def by_claim(self) -> dict[tuple, ResultRow]:
        return {(r.context, r.method, r.probe, r.metric): r for r in self.rows}

    def claim(self, context: str, method: str, probe: str, metric: str) -> ResultRow | None:
        """The (context, method)'s row pooled over its seeds."""
        return self.by_claim.get((context, method, probe, metric))

    @cached_property
    def groups(self) -> list[tuple[str, str]]:
        """(context, method) in the order of results.parquet."""
        return list(dict.fromkeys((r.context, r.method) for r in self.rows))

    def cells_of(self, context: str, method: str) -> list[Model]:
        return [c for c in self.cells if c.key and (c.key.context, c.key.method) == (context, method)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_summary(path: Path) -> EvalSummary | None:
    """A model's summary.json; None when it is missing or unreadable (a partial run still renders)."""
    from dpolab.errors import DataError

    try:
        return EvalSummary.read(path) if path.exists() else None
    except DataError:
        return None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:  # a line cut short by a kill: keep the steps before it
                        break
    except OSError:
        pass
    return out


def _read_rows(out: Path) -> tuple[list[ResultRow], list[ResultRow]]:
    """(claims, per-seed rows): results.parquet and results_by_seed.parquet; failing the second, the cells'
    rows.json; failing the first (a run killed before the tables were written), the per-seed rows stand in for the
    claims. A run from before seeds were pooled has per-seed rows in results.parquet: they serve as both."""
    path, by_seed = out / "results.parquet", out / "results_by_seed.parquet"
    claims = read_results(path) if path.exists() else None
    if claims is not None and any(r.seed is not None for r in claims):
        return claims, claims
    if by_seed.exists():
        seed_rows = read_results(by_seed)
    else:
        seed_rows = []
        for f in sorted((out / "cells").glob("*/rows.json")):
            seed_rows.extend(read_rows_json(f))
    return (seed_rows if claims is None else claims), seed_rows


def _key_from_dir(d: Path) -> CellKey | None:
    info = _read_json(d / "cell.json")
    if info and {"context", "method", "seed"} <= set(info):
        return CellKey(str(info["context"]), str(info["method"]), int(info["seed"]))
    parts = d.name.split("__")
    if len(parts) == 3 and parts[2].startswith("s") and parts[2][1:].isdigit():
        return CellKey(parts[0], parts[1], int(parts[2][1:]))
    return None


def load_experiment(out: str | Path) -> Experiment:
    """Everything the report shows, from the folder `dpolab run` wrote."""
    import yaml

    out = Path(out)
    rows, seed_rows = _read_rows(out)  # NaN stays NaN: the report's formatting shows it as a dash
    keys = list(dict.fromkeys(CellKey(r.context, r.method, int(r.seed)) for r in seed_rows))
    found = {k: d for d in sorted((out / "cells").glob("*")) if d.is_dir() and (k := _key_from_dir(d)) is not None}
    keys += [k for k in found if k not in keys]
    cells = []
    for k in keys:
        d = out / "cells" / k.dirname
        cells.append(Model(name=k.dirname, key=k, eval_dir=d / "eval", summary=_read_summary(d / "eval" / "summary.json"),
                           train_metrics=_read_jsonl(d / "train" / "metrics.jsonl"), cell_info=_read_json(d / "cell.json")))
    baseline = Model(name=BASELINE, key=None, eval_dir=out / "baseline", summary=_read_summary(out / "baseline" / "summary.json"))
    spec_path = out / "spec.resolved.yaml"
    spec_text = spec_path.read_text(encoding="utf-8") if spec_path.exists() else None
    try:
        spec = yaml.safe_load(spec_text) if spec_text else {}
    except yaml.YAMLError:
        spec = {}
    return Experiment(out=out, rows=rows, baseline=baseline, cells=cells, spec_text=spec_text,
                      spec=spec if isinstance(spec, dict) else {}, environment=_read_json(out / "environment.json"),
                      timings=_read_json(out / "timings.json"), seed_rows=seed_rows)
