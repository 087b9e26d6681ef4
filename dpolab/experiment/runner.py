"""The grid runner: baseline once, then each (context, method, seed) cell builds data, trains, evaluates, compares.

Every cell's results are written atomically when the cell ends; a rerun with --resume skips finished cells, so a
kill loses at most the cell that was running. Cells share the on-policy pairs of their context and, through
$DPOLAB_HOME, the cached reference log-probs.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpolab.errors import ConfigError
from dpolab.experiment.results import compare, per_item_values, write_results
from dpolab.experiment.spec import ExperimentSpec
from dpolab.io import atomic_write_json, atomic_write_text


@dataclass
class RunReport:
    out: Path
    rows: list[dict[str, Any]]
    phases: list[tuple[str, float]] = field(default_factory=list)  # (phase, seconds)
    skipped: list[str] = field(default_factory=list)  # cells already done before this run


def cell_name(context: str, method: str, seed: int) -> str:
    return f"{context}__{method}__s{seed}"


def environment() -> dict[str, Any]:
    import os

    import torch
    import transformers

    from dpolab import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"dpolab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class _Phases:
    """Wall time of each phase, printed as it ends."""

    def __init__(self, console):
        self.console = console
        self.times: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.times.append((name, dt))
        self.console.print(f"[dim]{name}: {dt:.1f} s")


def _stance_reader(summary: dict) -> str | None:
    info = summary.get("probes", {}).get("persuasion", {}).get("info", {})
    return (info.get("calibration") or {}).get("reader") or info.get("reader")


def _takes_stance(context: str) -> bool:
    from dpolab.contexts import CONTEXTS

    return "stance" in CONTEXTS.get(context).option_names()


def run_experiment(spec: ExperimentSpec, out: str | Path, *, resume: bool = False, quick: bool = False, progress: bool = True,
                   stop_after_cells: int | None = None) -> RunReport:
    """Run the grid of `spec` into `out`; see the module docstring. Returns the rows of results.parquet.

    stop_after_cells: end after this many cells have been run in this call (used to test resuming).
    """
    from rich.console import Console

    from dpolab.contexts import build_context
    from dpolab.models.generate import HFChatModel
    from dpolab.models.load import load_model
    from dpolab.probes.run import run_eval
    from dpolab.training.loop import train

    import torch

    out = Path(out)
    console = Console(stderr=True)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    marker = out / "experiment.json"
    fingerprint = spec.fingerprint()
    if marker.exists():
        saved = json.loads(marker.read_text())
        if not resume:
            raise ConfigError(f"{out} already holds an experiment; continue it with --resume, or choose another --out")
        if saved["spec_fingerprint"] != fingerprint:
            raise ConfigError(f"{out} was run with a different spec (or without/with --quick); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"spec_fingerprint": fingerprint, "quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    atomic_write_text(out / "spec.resolved.yaml", __import__("yaml").safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    atomic_write_json(out / "environment.json", environment())

    phases = _Phases(console)
    report = RunReport(out=out, rows=[])
    cells = spec.cells()
    done = [c for c in cells if (out / "cells" / cell_name(*c) / "cell.json").exists()]
    report.skipped = [cell_name(*c) for c in done]
    if done:
        console.print(f"resuming: {len(done)} of {len(cells)} cells already finished")
    probe_kw = dict(probes=spec.probes.names, sizes=spec.probes.sizes, limit=spec.probes.limit, stance=spec.probes.stance,
                    n_boot=spec.n_boot)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[phase]}"), console=console, disable=not progress)
    t_start = time.perf_counter()
    with bar:
        task = bar.add_task("cells", total=len(cells), completed=len(done), phase="baseline")
        base_dir = out / "baseline"
        base_model = None

        def base_chat():
            nonlocal base_model
            if base_model is None:
                base_model = HFChatModel(load_model(spec.model), batch_size=spec.probes.batch_size)
            return base_model

        if not (base_dir / "DONE").exists():
            with phases("baseline eval"):
                shutil.rmtree(base_dir, ignore_errors=True)
                run_eval(base_chat(), out=base_dir, seed=0, **probe_kw)
                (base_dir / "DONE").write_text("")
        baseline = json.loads((base_dir / "summary.json").read_text())
        baseline_items = per_item_values(base_dir)
        # One stance reader for everything: the baseline's calibrated choice is used by the contexts' pairs and by
        # every later eval, so a trained model can't switch readers and make its numbers incomparable.
        reader = _stance_reader(baseline) or spec.probes.stance
        probe_kw["stance"] = reader

        ran = 0
        for context, method, seed in cells:
            name = cell_name(context, method, seed)
            cell_dir = out / "cells" / name
            if (cell_dir / "cell.json").exists():
                continue
            if stop_after_cells is not None and ran >= stop_after_cells:
                break
            shutil.rmtree(cell_dir, ignore_errors=True)  # a cell cut short starts over
            cell_dir.mkdir(parents=True)
            bar.update(task, phase=f"{name}: pairs")
            with phases(f"{name}: pairs"):
                ctx_spec = spec.contexts[context]
                options = {**({"stance": reader} if _takes_stance(context) else {}), **ctx_spec.options}
                data_path = build_context(context, base_chat(), options=options, seed=seed, quick=quick,
                                          cache_dir=out / "contexts", model_id=spec.model)
            bar.update(task, phase=f"{name}: train")
            with phases(f"{name}: train"):
                cfg = spec.train_config(context, method, data=str(data_path), out=str(cell_dir / "train"), seed=seed)
                trained = train(cfg)
            bar.update(task, phase=f"{name}: eval")
            with phases(f"{name}: eval"):
                loaded = load_model(spec.model)  # tokenizer and identity of the base; weights replaced below
                loaded.model = trained.model.eval()
                loaded.name = f"{spec.model} + {context}/{method}/s{seed}"
                summary = run_eval(HFChatModel(loaded, batch_size=spec.probes.batch_size), out=cell_dir / "eval", seed=0, **probe_kw)
            rows = [{"context": context, "method": method, "seed": seed, **r}
                    for r in compare(baseline, summary, baseline_items, per_item_values(cell_dir / "eval"), seed=seed, n_boot=spec.n_boot)]
            atomic_write_json(cell_dir / "rows.json", rows)
            atomic_write_json(cell_dir / "cell.json", {"context": context, "method": method, "seed": seed, "data": str(data_path),
                                                 "train_steps": trained.steps, "rows": len(rows)})
            ran += 1
            bar.advance(task)
            del trained, loaded

    for context, method, seed in cells:
        rows_file = out / "cells" / cell_name(context, method, seed) / "rows.json"
        if rows_file.exists():
            report.rows.extend(json.loads(rows_file.read_text()))
    with phases("results"):
        write_results(report.rows, out / "results.parquet")
    total = time.perf_counter() - t_start
    report.phases = phases.times
    atomic_write_json(out / "timings.json", {"phases": phases.times, "total_s": total})
    from dpolab.report import write_report

    write_report(out, phases=phases.times)
    budget = spec.budgets.quick_minutes if quick else spec.budgets.total_minutes
    console.print(f"wall time {total / 60:.1f} min (budget {budget:g} min) -> {out / 'report.html'}")
    return report
