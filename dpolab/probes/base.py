"""What a probe is (a name, typed options, a run function) and what it returns (metrics with polarity and CIs,
raw records, per-item values for paired comparisons)."""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dpolab.errors import ConfigError
from dpolab.probes import stats
from dpolab.probes.items import Item, stable_hash

if TYPE_CHECKING:
    from dpolab.models.generate import ChatModel


@dataclass(frozen=True)
class Metric:
    """One number a probe reports, with its 95% bootstrap CI over items and its polarity."""

    value: float
    ci_low: float
    ci_high: float
    n: int  # items the value is computed over
    higher_is_better: bool
    aggregate: str = "mean"  # how per-item values reduce to the value (a key of stats.AGGREGATES)

    def to_json(self) -> dict[str, Any]:
        clean = lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else x  # noqa: E731
        return {"value": clean(self.value), "ci_low": clean(self.ci_low), "ci_high": clean(self.ci_high),
                "n": self.n, "higher_is_better": self.higher_is_better, "aggregate": self.aggregate}


@dataclass
class ProbeResult:
    """A probe's output.

    metrics: name -> Metric.
    records: one dict per item (or per item x condition) with the raw prompt, transcript and scores; written to
        DIR/<probe>.parquet. Model text is kept raw.
    per_item: {"item_id", "metric", "value"} rows, so a paired bootstrap between two models can resample items;
        written to DIR/<probe>_items.parquet.
    info: notes for the summary (which stance reader was used, how many targets were assigned, seeds, ...).
    """

    name: str
    metrics: dict[str, Metric]
    records: list[dict[str, Any]]
    per_item: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"metrics": {k: m.to_json() for k, m in self.metrics.items()}, "info": self.info}


class MetricTable:
    """Collects per-item values under declared metrics and turns them into Metrics with bootstrap CIs.

    Declaring first keeps polarity and aggregation next to the metric's definition, and makes a value for an
    undeclared metric an error rather than a silently unlabelled number.
    """

    def __init__(self) -> None:
        self._specs: dict[str, tuple[bool, str]] = {}
        self._values: dict[str, dict[str, float]] = defaultdict(dict)

    def declare(self, name: str, *, higher_is_better: bool, aggregate: str = "mean") -> None:
        if aggregate not in stats.AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}")
        self._specs[name] = (higher_is_better, aggregate)

    def add(self, name: str, item_id: str, value: float) -> None:
        if name not in self._specs:
            raise KeyError(f"metric {name!r} was not declared")
        self._values[name][item_id] = float(value)

    def result(self, name: str, *, records: list[dict[str, Any]], info: dict[str, Any] | None = None,
               seed: int, n_boot: int = 2000) -> ProbeResult:
        """The ProbeResult: every declared metric with its bootstrap CI over items, and the per-item rows."""
        metrics: dict[str, Metric] = {}
        rows: list[dict[str, Any]] = []
        for metric, (hib, agg) in self._specs.items():
            values = self._values.get(metric, {})
            iv = stats.bootstrap_ci(list(values.values()), seed=stable_hash(seed, metric), n_boot=n_boot,
                                    statistic=agg)
            metrics[metric] = Metric(iv.value, iv.ci_low, iv.ci_high, iv.n, hib, agg)
            rows.extend({"item_id": k, "metric": metric, "value": v} for k, v in values.items())
        return ProbeResult(name=name, metrics=metrics, records=records, per_item=rows, info=dict(info or {}))


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def describe(self, text: str) -> None: ...


class Progress(Protocol):
    """Where probes report progress; the CLI shows rich bars, the library default shows nothing."""

    def task(self, description: str, total: int) -> Task: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


class NullProgress:
    def task(self, description: str, total: int) -> Task:
        return _NullTask()


@dataclass
class EvalContext:
    """What every probe of one eval run shares.

    items: the MCQ items item-based probes report on: the shipped bank's test split, or all of a user's file.
    items_source: where they came from, for the summary.
    seed: seeds sampling, selection and bootstrap.
    limit: cap on items (prompts, instructions) per probe; None for each probe's default size.
    stance: "auto", "letter" or "cloze": how MCQ stances are read (see dpolab.probes.stance).
    n_boot: bootstrap resamples per metric.
    """

    items: list[Item]
    items_source: str = "bank:test"
    seed: int = 0
    limit: int | None = None
    stance: str = "auto"
    n_boot: int = 2000
    progress: Progress = field(default_factory=NullProgress)
    cache: dict[str, Any] = field(default_factory=dict)  # shared results: the stance calibration, assigned targets

    def size(self, default: int | None) -> int | None:
        """How many items a probe takes: its default, capped by --limit."""
        if self.limit is None:
            return default
        return self.limit if default is None else min(self.limit, default)


@dataclass(frozen=True)
class ProbeSpec:
    """A registered probe: its name, its typed options, and the function that runs it."""

    name: str
    options: type  # a frozen keyword-only dataclass; its defaults are the default eval sizes
    run: Callable[[ChatModel, EvalContext, Any], ProbeResult]  # (model, ctx, options)
    uses_items: bool = False

    def make_options(self, overrides: dict[str, Any] | None = None):
        """Options with overrides applied; unknown keys fail, listing the valid ones."""
        overrides = dict(overrides or {})
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} for probe {self.name!r}; "
                              f"choose from {', '.join(sorted(fields))}")
        return self.options(**{k: _coerce(f"{self.name}.{k}", str(fields[k].type), v) for k, v in overrides.items()})


def _coerce(name: str, annotation: str, value: Any) -> Any:
    """Turn a command-line value into the option's declared type ("a,b" -> tuple, "3" -> int), or fail."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if "None" in annotation:
            return None
        raise ConfigError(f"{name} cannot be empty")
    try:
        if annotation.startswith("tuple"):
            parts = value.split(",") if isinstance(value, str) else list(value)
            cast = int if "tuple[int" in annotation else str
            return tuple(cast(str(p).strip()) for p in parts if str(p).strip())
        if annotation.startswith("int"):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if annotation.startswith("float"):
            return float(value)
        if annotation.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a valid {annotation}") from None
