"""The grid runner: baseline once, then each (context, method, seed) cell builds data, trains (or, for an edit
method, edits the base weights: dpolab.edits), evaluates, compares;
at the end the cells are pooled over seeds and against their placebos (dpolab.experiment.pool).

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
from typing import TYPE_CHECKING, Any

import yaml

from dpolab.edits import EditReport
from dpolab.errors import ConfigError
from dpolab.experiment.results import ResultRow, compare, per_item_values, read_rows_json, write_results
from dpolab.experiment.spec import ExperimentSpec, MethodSpec
from dpolab.io import atomic_write_json, atomic_write_text
from dpolab.methods import METHOD_KINDS
from dpolab.probes.summary import EvalSummary
from dpolab.progress import PlainLines, duration, interactive

if TYPE_CHECKING:
    import torch


@dataclass
class RunReport:
    out: Path
    rows: list[ResultRow]  # results.parquet: each (context, method) pooled over its seeds
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
    """Wall time of each phase, printed as it ends: dimmed under the terminal's bar or, when the output is not a
    terminal (a log), as one plain line with the time so far and an estimate of what is left."""

    def __init__(self, console, lines: PlainLines | None, cells: int):
        self.console = console
        self.lines = lines
        self.times: list[tuple[str, float]] = []
        self.cells_left = cells  # cells of this call not finished yet, the running one included
        self.cell_seconds: list[float] = []  # the cells finished in this call
        self.cell = ""  # "cell 2/6 " while a cell runs: each line of a log then says where the run is
        self.cell_start: float | None = None

    def left(self) -> float | None:
        """The time still to go: the mean cell of this call so far for each cell not finished (the running one less
        the time it has had, but not below zero); none before the first cell ends, and none after the last."""
        if not self.cell_seconds or not self.cells_left:
            return None
        mean = sum(self.cell_seconds) / len(self.cell_seconds)
        running = self.cell_start is not None
        current = max(0.0, mean - (time.perf_counter() - self.cell_start)) if running else 0.0
        return current + mean * (self.cells_left - running)

    def say(self, text: str) -> None:
        """A line of its own: plain in a log, on the console on a terminal."""
        if self.lines is not None:
            self.lines.line(text, left=self.left())
        else:
            self.console.print(text)

    def start_cell(self, number: str, name: str) -> None:
        self.cell, self.cell_start = f"{number} ", time.perf_counter()
        if self.lines is not None:  # on a terminal the bar shows the cell
            self.say(f"{number} {name}: started")

    def end_cell(self, number: str, name: str) -> None:
        dt = time.perf_counter() - self.cell_start
        self.cell_seconds.append(dt)
        self.cells_left -= 1
        self.cell, self.cell_start = "", None
        if self.lines is not None:
            self.say(f"{number} {name}: done in {duration(dt)}")

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.times.append((name, dt))
        if self.lines is not None:
            self.lines.line(f"{self.cell}{name} done in {duration(dt)}", left=self.left())
        else:
            self.console.print(f"[dim]{name}: {dt:.1f} s")


def _takes_stance(context: str) -> bool:
    from dpolab.contexts import CONTEXTS

    return "stance" in CONTEXTS.get(context).option_names()


@dataclass
class _Edited:
    model: "torch.nn.Module"  # the base model with its weights edited
    report: EditReport


def _edit_cell(model_name: str, edit: MethodSpec, data_path: Path, out: Path, *, seed: int) -> _Edited:
    """An edit cell's model: the base loaded afresh, edited in place from the context's pairs (`edit` is the
    method's MethodSpec); its report is written to OUT/edit.json."""
    from dpolab.data.read import read_pairs
    from dpolab.edits.profs import apply_edit
    from dpolab.models.load import load_model

    base = load_model(model_name)
    report = apply_edit(base.model, base.tokenizer, read_pairs(data_path).pairs, kind=edit.edit, layers=edit.layers,
                        k=edit.k, seed=seed)
    atomic_write_json(out / "edit.json", report.to_json())
    return _Edited(model=base.model, report=report)


def _kind_cell(spec: ExperimentSpec, kind: str, context: str, method: str, source: str, options: dict[str, Any],
               data_path: Path, cell_dir: Path, *, seed: int, base, say):
    """A cell of a registered method kind (dpolab.methods): its job, run; returns its Tuned."""
    from dpolab.methods import CellJob

    cfg = spec.train_config(context, method, data=str(data_path), out=str(cell_dir / "train"), seed=seed)
    job = CellJob(config=cfg, options=spec.methods[method].kind_options(), base=base, model_name=spec.model,
                  context=context, source=source, context_options=options, seed=seed, work=cell_dir / kind, say=say)
    job.work.mkdir(parents=True, exist_ok=True)
    return METHOD_KINDS.get(kind).run(job)


def _explain_cell(spec: ExperimentSpec, tuned, behaviour: str, keys: dict[str, Any], out: Path, *, say) -> None:
    """`dpolab explain` of one behaviour between the spec's model and this cell's (in memory), into OUT."""
    from dpolab.explain.run import ExplainOptions, explain
    from dpolab.models.load import load_model
    from dpolab.options import make_options

    options = make_options(ExplainOptions, {"n_boot": spec.n_boot, **keys}, kind="explain of", name=behaviour)
    explain(load_model(spec.model), tuned, behaviour, out, options=options, say=say)


def run_experiment(spec: ExperimentSpec, out: str | Path, *, resume: bool = False, quick: bool = False, progress: bool = True,
                   stop_after_cells: int | None = None) -> RunReport:
    """Run the grid of `spec` into `out`; see the module docstring. Returns the rows of results.parquet.

    stop_after_cells: end after this many cells have been run in this call (used to test resuming).
    """
    from rich.console import Console

    from dpolab.contexts import build_context
    from dpolab.contexts.placebo import build_placebo, parse_placebo
    from dpolab.experiment.pool import pool_run
    from dpolab.models.backends import chat_model
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
    atomic_write_text(out / "spec.resolved.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    atomic_write_json(out / "environment.json", environment())

    report = RunReport(out=out, rows=[])
    cells = spec.cells()
    done = [c for c in cells if (out / "cells" / cell_name(*c) / "cell.json").exists()]
    todo = len(cells) - len(done) if stop_after_cells is None else min(stop_after_cells, len(cells) - len(done))
    phases = _Phases(console, None if interactive() else PlainLines(), cells=todo)
    report.skipped = [cell_name(*c) for c in done]
    if done:
        phases.say(f"resuming: {len(done)} of {len(cells)} cells already finished")
    probe_kw = dict(probes=spec.probes.names, sizes=spec.probes.sizes, limit=spec.probes.limit, stance=spec.probes.stance,
                    n_boot=spec.n_boot)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[phase]}"), console=console, disable=not progress or phases.lines is not None)
    t_start = time.perf_counter()
    with bar:
        task = bar.add_task("cells", total=len(cells), completed=len(done), phase="baseline")
        base_dir = out / "baseline"
        base_model = None

        def engine(loaded):
            return chat_model(loaded, backend=spec.backend, batch_size=spec.probes.batch_size, int8=spec.int8,
                              echo=phases.say)

        def base_chat():
            nonlocal base_model
            if base_model is None:
                base_model = engine(load_model(spec.model))
            return base_model

        if not (base_dir / "DONE").exists():
            with phases("baseline eval"):
                shutil.rmtree(base_dir, ignore_errors=True)
                run_eval(base_chat(), out=base_dir, seed=0, **probe_kw)
                (base_dir / "DONE").write_text("")
        baseline = EvalSummary.read(base_dir / "summary.json")
        baseline_items = per_item_values(base_dir)
        # One stance reader for everything: the baseline's calibrated choice is used by the contexts' pairs and by
        # every later eval, so a trained model can't switch readers and make its numbers incomparable.
        reader = baseline.stance_reader() or spec.probes.stance
        probe_kw["stance"] = reader

        ran = 0
        for context, method, seed in cells:
            name = cell_name(context, method, seed)
            cell_dir = out / "cells" / name
            if (cell_dir / "cell.json").exists():
                continue
            if stop_after_cells is not None and ran >= stop_after_cells:
                break
            # a cell cut short starts over, but a method kind's own folder (its finished rounds, stages, samples,
            # checkpoints) is kept: the kind resumes from it
            kind = spec.method_kind(method)
            keep = kind if kind in METHOD_KINDS else None
            for part in cell_dir.iterdir() if cell_dir.exists() else ():
                if part.name != keep:
                    shutil.rmtree(part) if part.is_dir() else part.unlink()
            cell_dir.mkdir(parents=True, exist_ok=True)
            # numbered in the whole grid, so a resumed run's log goes on from where the last one stopped
            number = f"cell {len(done) + ran + 1}/{len(cells)}"
            phases.start_cell(number, name)
            bar.update(task, phase=f"{name}: pairs")
            with phases(f"{name}: pairs"):
                placebo = parse_placebo(context)
                source = context if placebo is None else placebo[1]
                ctx_spec = spec.contexts[source]
                options = {**({"stance": reader} if _takes_stance(source) else {}), **ctx_spec.options}
                # the spec's options are final: --quick sizes were applied when it was loaded
                data_path = build_context(source, base_chat(), options=options, seed=seed,
                                          cache_dir=out / "contexts", model_id=spec.model)
                if placebo is not None:  # the source's own pairs, turned into its control
                    data_path = build_placebo(placebo[0], data_path, base_chat(), seed=seed,
                                              cache_dir=out / "contexts", model_id=spec.model)
            bar.update(task, phase=f"{name}: {kind}")
            with phases(f"{name}: {kind}"):
                if kind == "train":
                    cfg = spec.train_config(context, method, data=str(data_path), out=str(cell_dir / "train"), seed=seed)
                    trained = train(cfg)
                    tuned, steps, extra = trained.model, trained.steps, {}
                    del trained
                elif kind != "edit":  # a registered kind (dpolab.methods) runs the cell's tuning itself
                    result = _kind_cell(spec, kind, context, method, source, options, data_path, cell_dir, seed=seed,
                                        base=base_chat(), say=phases.say)
                    tuned, steps, extra = result.model, result.steps, {kind: result.info}
                    del result
                else:  # the base model's weights edited from the pairs: nothing is trained
                    edited = _edit_cell(spec.model, spec.methods[method], data_path, cell_dir / "edit", seed=seed)
                    tuned, steps, extra = edited.model, 0, {"edit": edited.report.summary()}
            bar.update(task, phase=f"{name}: eval")
            with phases(f"{name}: eval"):
                loaded = load_model(spec.model)  # tokenizer and identity of the base; weights replaced below
                loaded.model = tuned.eval()
                loaded.name = f"{spec.model} + {context}/{method}/s{seed}"
                summary = run_eval(engine(loaded), out=cell_dir / "eval", seed=0, **probe_kw)
            behaviours = spec.contexts[context].explain if parse_placebo(context) is None else {}
            for behaviour, explain_keys in behaviours.items():
                with phases(f"{name}: explain {behaviour}"):
                    _explain_cell(spec, loaded, behaviour, explain_keys, cell_dir / "explain" / behaviour, say=phases.say)
            rows = compare(baseline, summary, baseline_items, per_item_values(cell_dir / "eval"), context=context,
                           method=method, seed=seed, n_boot=spec.n_boot)
            atomic_write_json(cell_dir / "rows.json", [r.record() for r in rows])
            atomic_write_json(cell_dir / "cell.json", {"context": context, "method": method, "seed": seed, "data": str(data_path),
                                                 "train_steps": steps, "rows": len(rows), **extra})
            ran += 1
            phases.end_cell(number, name)
            bar.advance(task)
            del tuned, loaded

    seed_rows: list[ResultRow] = []
    for context, method, seed in cells:
        rows_file = out / "cells" / cell_name(context, method, seed) / "rows.json"
        if rows_file.exists():
            seed_rows.extend(read_rows_json(rows_file))
    with phases("results"):
        report.rows = pool_run(out, cells, n_boot=spec.n_boot, seed_rows=seed_rows)
        write_results(seed_rows, out / "results_by_seed.parquet")
        write_results(report.rows, out / "results.parquet")
    total = time.perf_counter() - t_start
    report.phases = list(phases.times)
    atomic_write_json(out / "timings.json", {"phases": report.phases, "total_s": total})
    from dpolab.report import write_report

    with phases("report"):  # timed for the log only: the report and timings.json cannot hold their own writing
        write_report(out, phases=report.phases)
    budget = spec.budgets.quick_minutes if quick else spec.budgets.total_minutes
    console.print(f"wall time {total / 60:.1f} min (budget {budget:g} min) -> {out / 'report.html'}")
    return report
