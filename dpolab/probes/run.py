"""`run_eval`: run the chosen probes on one model and write DIR/summary.json and per-probe Parquet files."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpolab.errors import ConfigError
from dpolab.io import atomic_write
from dpolab.models.chat import ChatModel
from dpolab.probes.base import EvalContext, ProbeResult
from dpolab.probes.summary import EvalSummary
from dpolab.progress import NullProgress, Progress
from dpolab.banks import bank_items, read_items

def rows_to_table(rows: Sequence[dict[str, Any]]):
    """A pyarrow table whose columns are the union of the rows' keys (missing values are null)."""
    import pyarrow as pa

    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return pa.table({k: pa.array([r.get(k) for r in rows]) for k in keys})


def write_parquet(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    import pyarrow.parquet as pq

    table = rows_to_table(rows)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_result(out: Path, result: ProbeResult) -> None:
    """DIR/<probe>.parquet (records) and DIR/<probe>_items.parquet (item_id, metric, value)."""
    write_parquet(out / f"{result.name}.parquet", result.records)
    write_parquet(out / f"{result.name}_items.parquet", result.per_item)


def default_sizes() -> dict[str, dict[str, Any]]:
    """Every probe's default options: the sizes of the default eval."""
    from dpolab.probes import PROBES

    return {name: dataclasses.asdict(PROBES.get(name).options()) for name in PROBES.names()}


def parse_probes(probes: str | Sequence[str] | None) -> list[str]:
    """Probe names from a list or a comma-separated string (default: the default probes), checked against the
    registry, in run order: probes that declare `runs_last` after the others."""
    from dpolab.probes import PROBES, default_probes

    names = default_probes() if probes is None else (
        [p.strip() for p in probes.split(",")] if isinstance(probes, str) else list(probes))
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"no probe given; choose from {', '.join(PROBES.names())}")
    for n in names:
        PROBES.check(n)
    return sorted(dict.fromkeys(names), key=lambda n: PROBES.get(n).runs_last)


def run_eval(
    model: str | ChatModel,
    *,
    probes: str | Sequence[str] | None = None,
    items: str | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    sizes: dict[str, dict[str, Any]] | None = None,
    stance: str = "auto",
    batch_size: int = 32,
    dtype: str = "float32",
    backend: str = "auto",
    int8: bool = False,
    n_boot: int = 2000,
    progress: Progress | None = None,
) -> EvalSummary:
    """Run probes on a model; return the summary and, with `out`, write it (summary.json) and the Parquet files there.

    model: a built-in name, a Hugging Face folder, or any ChatModel (e.g. a fake in tests).
    probes: names or a comma-separated string; default all (see dpolab.probes.PROBES).
    items: a JSONL of MCQ items replacing the shipped bank's test split (all its items are used).
    limit: cap on items (prompts, instructions) per probe.
    sizes: per-probe option overrides, e.g. {"persuasion": {"turns": 2, "n_items": 8}}.
    stance: how MCQ stances are read: auto (calibrated), letter or cloze.
    batch_size: conversations per generate call, when `model` is a name.
    backend, int8: the inference engine when `model` is a name (dpolab.models.backends.chat_model).
    """
    from dpolab.probes import PROBES
    from dpolab.runtime import tune_allocator

    tune_allocator()
    names = parse_probes(probes)
    sizes = dict(sizes or {})
    for key in sizes:
        PROBES.check(key)
    from dpolab.stance import STANCE_CHOICES

    if stance not in STANCE_CHOICES:
        raise ConfigError(f"unknown stance reader {stance!r}; choose from {', '.join(STANCE_CHOICES)}")
    specs = {n: PROBES.get(n) for n in names}
    options = {n: specs[n].make_options(sizes.get(n)) for n in names}
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1")
    needs_items = any(specs[n].uses_items for n in names)
    mcq = (read_items(items) if items else bank_items("test")) if needs_items else []
    if isinstance(model, str):
        from dpolab.models.backends import chat_model
        from dpolab.models.load import load_model

        chat: ChatModel = chat_model(load_model(model, dtype=dtype), backend=backend, batch_size=batch_size, int8=int8)
        model_name = chat.name
    else:
        chat, model_name = model, getattr(model, "name", type(model).__name__)
    ctx = EvalContext(items=mcq, items_source=str(items) if items else "bank:test", seed=seed, limit=limit,
                      stance=stance, n_boot=n_boot, progress=progress or NullProgress())
    summary = EvalSummary(model=model_name, backend=getattr(chat, "backend", None), seed=seed, items=ctx.items_source, limit=limit, stance=stance,
                          sizes={n: dataclasses.asdict(o) for n, o in options.items()})
    out_dir = Path(out) if out is not None else None
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        result = specs[name].run(chat, ctx, options[name])
        if hasattr(chat, "clear_cache"):
            chat.clear_cache()  # cached prefixes of one probe's prompts are of no use to the next
        summary.probes[name] = result.summary()
        summary.wall_time_s[name] = round(time.perf_counter() - t0, 2)
        if out_dir is not None:
            write_result(out_dir, result)
            summary.write(out_dir / "summary.json")  # after every probe, so a long run keeps what it has
    summary.wall_time_s["total"] = round(time.perf_counter() - start, 2)
    for name in names:
        if specs[name].finish is not None:  # e.g. self-report: its ratings beside what the other probes measured
            specs[name].finish(summary)
    if out_dir is not None:
        summary.write(out_dir / "summary.json")
    return summary


def summary_table(summary: EvalSummary, *, headline_only: bool = True):
    """A rich Table of the summary: one row per metric, value [CI], n and polarity.

    headline_only: skip the by-technique / by-domain / by-category breakdowns (metric names with "|").
    """
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"dpolab eval: {summary.model}"))
    for col in ("probe", "metric", "value", "95% CI", "n", "better"):
        table.add_column(col, justify="right" if col in ("value", "95% CI", "n") else "left")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for probe, res in summary.probes.items():
        for name, m in res.metrics.items():
            if headline_only and "|" in name:
                continue
            table.add_row(probe, escape(name), fmt(m.value), escape(f"[{fmt(m.ci_low)}, {fmt(m.ci_high)}]"), str(m.n),
                          "higher" if m.higher_is_better else "lower")
    return table


def beside_table(summary: EvalSummary):
    """The model's self-ratings (1-5, or 0-100 for risk) next to the behaviour the other probes measured."""
    from rich.table import Table

    table = Table(title="self-report beside the measured behaviour")
    for col in ("behaviour", "self-rating", "measured by", "measured"):
        table.add_column(col, justify="right" if col in ("self-rating", "measured") else "left")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for b, v in (summary.probe("self_report").beside or {}).items():
        table.add_row(b, fmt(v["self_rating"]), f"{v['probe']}.{v['metric']}" if v["metric"] else "-", fmt(v["measured"]))
    return table
