"""What a probe is (a name, typed options, a run function) and what it returns (metrics with polarity and CIs,
raw records, per-item values for paired comparisons)."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dpolab.options import make_options
from dpolab.probes.summary import EvalSummary, ProbeSummary
from dpolab.progress import NullProgress, Progress
from dpolab import stats
from dpolab.banks import Item, stable_hash

if TYPE_CHECKING:
    from dpolab.models.chat import ChatModel


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

    def summary(self) -> ProbeSummary:
        return ProbeSummary.model_validate({"metrics": {k: m.to_json() for k, m in self.metrics.items()}, "info": self.info})


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


@dataclass
class EvalContext:
    """What every probe of one eval run shares.

    items: the MCQ items item-based probes report on: the shipped bank's test split, or all of a user's file.
    items_source: where they came from, for the summary.
    seed: seeds sampling, selection and bootstrap.
    limit: cap on items (prompts, instructions) per probe; None for each probe's default size.
    stance: "auto", "letter" or "cloze": how MCQ stances are read (see dpolab.stance).
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
class Headline:
    """A metric the matrix shows as a column, the headline sentences name, and the report opens with.

    metric: a per-turn metric ("neg_acc@3") is read at the last turn a run has.
    """

    label: str
    metric: str
    higher_is_better: bool


@dataclass(frozen=True)
class ProbeSpec:
    """A registered probe: everything the rest of dpolab needs to know about it comes from here.

    name: its registry name.
    options: a frozen keyword-only dataclass; its defaults are the default eval sizes.
    run: (model, ctx, options) -> ProbeResult.
    summary: one line, what it measures (CLI help, report).
    headlines: the metrics the improve/harm matrix shows, with their polarity.
    default: run by `dpolab eval` and the default spec when no probes are named.
    quick: option overrides of `--quick`.
    report: the report section that shows it (a name in dpolab.report.sections.SECTIONS; "generic" is a table of
        its metrics per model).
    runs_last: runs after the other probes (self-report, shown beside what they measured).
    finish: called with the whole eval's summary once every probe has run, to add what the probe sees of the
        others (self-report's `beside`).
    uses_items: reads the run's MCQ items (so `--items` applies).
    """

    name: str
    options: type
    run: Callable[[ChatModel, EvalContext, Any], ProbeResult]
    summary: str = ""
    headlines: tuple[Headline, ...] = ()
    default: bool = True
    quick: dict[str, Any] = field(default_factory=dict)
    report: str = "generic"
    runs_last: bool = False
    finish: Callable[[EvalSummary], None] | None = None
    uses_items: bool = False

    def make_options(self, overrides: dict[str, Any] | None = None, *, quick: bool = False):
        """Options with the quick sizes (if asked) and then `overrides` applied; validated as contexts' options are
        (dpolab.options): unknown keys fail listing the valid ones, values must fit the field types."""
        return make_options(self.options, overrides, kind="probe", name=self.name, base=self.quick if quick else None)


def mean_token_logps(model: ChatModel, convs: list, texts: list[list[str]]) -> list[list[float]]:
    """Per-token mean log-prob of each candidate reply text given its conversation: fixed replies of different
    lengths compared without the length deciding (the care, role-play and pattern probes' paired readings)."""
    summed = model.score_continuations(convs, texts)
    return [[s / max(1, model.token_count(t)) for s, t in zip(ss, ts)] for ss, ts in zip(summed, texts)]
