"""`run_eval`: run the chosen probes on one model and write DIR/summary.json and per-probe Parquet files."""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpolab.errors import ConfigError
from dpolab.io import atomic_write
from dpolab.models.generate import ChatModel
from dpolab.probes.base import EvalContext, NullProgress, ProbeResult, Progress
from dpolab.probes.items import bank_items, read_items

DEFAULT_PROBES = ("persuasion", "sycophancy", "toxicity", "verbosity", "knowledge", "self_report")


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


def write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, allow_nan=False)
            f.write("\n")

    atomic_write(path, write)


def write_result(out: Path, result: ProbeResult) -> None:
    """DIR/<probe>.parquet (records) and DIR/<probe>_items.parquet (item_id, metric, value)."""
    write_parquet(out / f"{result.name}.parquet", result.records)
    write_parquet(out / f"{result.name}_items.parquet", result.per_item)


def default_sizes() -> dict[str, dict[str, Any]]:
    """Every probe's default options: the sizes of the default eval."""
    from dpolab.probes import PROBES

    return {name: dataclasses.asdict(PROBES.get(name).options()) for name in PROBES.names()}


def _check_probe(name: str) -> None:
    from dpolab.probes import PROBES
    from dpolab.registry import RegistryError

    try:
        PROBES.check(name)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None


def parse_probes(probes: str | Sequence[str] | None) -> list[str]:
    from dpolab.probes import PROBES

    if probes is None:
        return list(DEFAULT_PROBES)
    names = [p.strip() for p in probes.split(",")] if isinstance(probes, str) else list(probes)
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"no probe given; choose from {', '.join(PROBES.names())}")
    for n in names:
        _check_probe(n)
    # self_report runs last so its ratings can be shown beside the behaviours measured in the same run
    return sorted(dict.fromkeys(names), key=lambda n: n == "self_report")


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
    n_boot: int = 2000,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run probes on a model; return the summary and, with `out`, write it and the Parquet files there.

    model: a built-in name, a Hugging Face folder, or any ChatModel (e.g. a fake in tests).
    probes: names or a comma-separated string; default all (see dpolab.probes.PROBES).
    items: a JSONL of MCQ items replacing the shipped bank's test split (all its items are used).
    limit: cap on items (prompts, instructions) per probe.
    sizes: per-probe option overrides, e.g. {"persuasion": {"turns": 2, "n_items": 8}}.
    stance: how MCQ stances are read: auto (calibrated), letter or cloze.
    batch_size: conversations per generate call, when `model` is a name.
    """
    from dpolab.probes import PROBES
    from dpolab.runtime import tune_allocator

    tune_allocator()
    names = parse_probes(probes)
    sizes = dict(sizes or {})
    for key in sizes:
        _check_probe(key)
    from dpolab.probes.stance import STANCE_CHOICES

    if stance not in STANCE_CHOICES:
        raise ConfigError(f"unknown stance reader {stance!r}; choose from {', '.join(STANCE_CHOICES)}")
    specs = {n: PROBES.get(n) for n in names}
    options = {n: specs[n].make_options(sizes.get(n)) for n in names}
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1")
    needs_items = any(specs[n].uses_items for n in names)
    mcq = (read_items(items) if items else bank_items("test")) if needs_items else []
    if isinstance(model, str):
        from dpolab.models.generate import HFChatModel

        chat: ChatModel = HFChatModel.load(model, dtype=dtype, batch_size=batch_size)
        model_name = model
    else:
        chat, model_name = model, getattr(model, "name", type(model).__name__)
    ctx = EvalContext(items=mcq, items_source=str(items) if items else "bank:test", seed=seed, limit=limit,
                      stance=stance, n_boot=n_boot, progress=progress or NullProgress())
    summary: dict[str, Any] = {
        "model": model_name,
        "seed": seed,
        "items": ctx.items_source,
        "limit": limit,
        "stance": stance,
        "sizes": {n: dataclasses.asdict(o) for n, o in options.items()},
        "probes": {},
        "wall_time_s": {},
    }
    out_dir = Path(out) if out is not None else None
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        result = specs[name].run(chat, ctx, options[name])
        if hasattr(chat, "clear_cache"):
            chat.clear_cache()  # cached prefixes of one probe's prompts are of no use to the next
        summary["probes"][name] = result.summary()
        summary["wall_time_s"][name] = round(time.perf_counter() - t0, 2)
        if out_dir is not None:
            write_result(out_dir, result)
            write_json(out_dir / "summary.json", summary)  # after every probe, so a long run keeps what it has
    summary["wall_time_s"]["total"] = round(time.perf_counter() - start, 2)
    if "self_report" in summary["probes"]:
        from dpolab.probes.self_report import beside

        summary["probes"]["self_report"]["beside"] = beside(summary)
    if out_dir is not None:
        write_json(out_dir / "summary.json", summary)
    return summary


class RichProgress:
    """Progress bars on the terminal (rich), one per probe step."""

    def __init__(self, console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as _Progress, TextColumn, TimeElapsedColumn

        self._bars = _Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=console, transient=False)

    def __enter__(self) -> RichProgress:
        self._bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bars.__exit__(*exc)

    def task(self, description: str, total: int):
        bars = self._bars
        tid = bars.add_task(description, total=total)

        class _Task:
            def advance(self, n: int = 1) -> None:
                bars.advance(tid, n)

            def describe(self, text: str) -> None:
                bars.update(tid, description=text)

        return _Task()


def summary_table(summary: dict[str, Any], *, headline_only: bool = True):
    """A rich Table of the summary: one row per metric, value [CI], n and polarity.

    headline_only: skip the by-technique / by-domain / by-category breakdowns (metric names with "|").
    """
    from rich.table import Table

    table = Table(title=f"dpolab eval: {summary['model']}")
    for col in ("probe", "metric", "value", "95% CI", "n", "better"):
        table.add_column(col, justify="right" if col in ("value", "95% CI", "n") else "left")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for probe, res in summary["probes"].items():
        for name, m in res["metrics"].items():
            if headline_only and "|" in name:
                continue
            table.add_row(probe, name, fmt(m["value"]), f"[{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]", str(m["n"]),
                          "higher" if m["higher_is_better"] else "lower")
    return table


def beside_table(summary: dict[str, Any]):
    """The model's self-ratings (1-5) next to the behaviour the other probes measured."""
    from rich.table import Table

    table = Table(title="self-report beside the measured behaviour")
    for col in ("behaviour", "self-rating (1-5)", "measured by", "measured"):
        table.add_column(col, justify="right" if col in ("self-rating (1-5)", "measured") else "left")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for b, v in summary["probes"]["self_report"]["beside"].items():
        table.add_row(b, fmt(v["self_rating"]), f"{v['probe']}.{v['metric']}" if v["metric"] else "-", fmt(v["measured"]))
    return table
