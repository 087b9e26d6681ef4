"""The eval summary: what `run_eval` returns and DIR/summary.json holds, one typed object with one reader and one
writer. The file's shape is the documented one: {"model", ..., "probes": {NAME: {"metrics": {METRIC: {"value",
"ci_low", "ci_high", "n", "higher_is_better", "aggregate"}}, "info": {...}}}, "wall_time_s": {...}}; an undefined
value (NaN) is written as null.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dpolab.io import atomic_write_text


class MetricSummary(BaseModel):
    """One metric of one probe: its value and 95% bootstrap CI over items (None where undefined)."""

    model_config = ConfigDict(extra="ignore")

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    higher_is_better: bool
    aggregate: str = "mean"

    @field_validator("value", "ci_low", "ci_high")
    @classmethod
    def _nan_is_none(cls, x: float | None) -> float | None:
        return None if x is None or math.isnan(x) else x

    def number(self, field: str = "value") -> float:
        """The value (or a CI end) as a float, NaN where undefined: for arithmetic."""
        x = getattr(self, field)
        return math.nan if x is None else float(x)


class ProbeSummary(BaseModel):
    """A probe's metrics and notes (which stance reader, how many items, ...); `beside` for self-report only."""

    model_config = ConfigDict(extra="ignore")

    metrics: dict[str, MetricSummary] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)
    beside: dict[str, dict[str, Any]] | None = None

    def metric(self, name: str) -> MetricSummary | None:
        return self.metrics.get(name)


class EvalSummary(BaseModel):
    """One model's eval: the run's settings, every probe's summary, and wall time per probe."""

    model_config = ConfigDict(extra="ignore")

    model: str
    backend: str | None = None  # the inference engine that ran it, e.g. "hf", "ctranslate2 float32"
    seed: int = 0
    items: str = "bank:test"
    limit: int | None = None
    stance: str = "auto"
    sizes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    probes: dict[str, ProbeSummary] = Field(default_factory=dict)
    wall_time_s: dict[str, float] = Field(default_factory=dict)

    def probe(self, name: str) -> ProbeSummary | None:
        return self.probes.get(name)

    def metric(self, probe: str, metric: str) -> MetricSummary | None:
        found = self.probes.get(probe)
        return None if found is None else found.metrics.get(metric)

    def stance_reader(self, probe: str = "persuasion") -> str | None:
        """The stance reader a probe calibrated to (or was given), if it ran: what later evals of other models
        must use, so a trained model can't switch readers and make its numbers incomparable."""
        found = self.probes.get(probe)
        info = found.info if found else {}
        return (info.get("calibration") or {}).get("reader") or info.get("reader")

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for p in data["probes"].values():
            if p.get("beside") is None:
                p.pop("beside", None)
        return data

    def write(self, path: str | Path) -> Path:
        """DIR/summary.json, atomically."""
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> EvalSummary:
        from dpolab.errors import DataError

        try:
            return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a dpolab eval summary ({exc})") from None
