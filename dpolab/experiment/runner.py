"""The grid runner: baseline once, then each (context, method, seed) cell builds data, trains (or, for an edit
method, edits the base weights: dpolab.edits), evaluates, compares;
at the end the cells are pooled over seeds and against their placebos (dpolab.experiment.pool).

Every cell's results are written atomically when the cell ends; a rerun with --resume skips finished cells, so a
kill loses at most the cell that was running. Cells share the on-policy pairs of their context and, through
$DPOLAB_HOME, the cached reference log-probs.
"""
from __future__ import annotations

import contextlib
import functools
import json
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

import yaml

from dpolab.edits import EditReport
from dpolab.errors import ConfigError
from dpolab.experiment.estimate import Estimate, calibrate, minutes
from dpolab.experiment.results import ResultRow, compare, per_item_values, read_rows_json, write_results
from dpolab.experiment.spec import ExperimentSpec, MethodSpec, cell_name
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


EXECUTORS = ("local", "ray")  # how the cells run: one after another here, or as Ray tasks (dpolab.experiment.ray_executor)


def environment() -> dict[str, Any]:
    import os

    import torch
    import transformers

    from dpolab import __version__

    from dpolab.bench.hardware import cpu_name, has_amx

    return {"dpolab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(), "cpu": cpu_name(), "amx": has_amx(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class _Phases:
    """Wall time of each phase, printed as it ends: dimmed under the terminal's bar or, when the output is not a
    terminal (a log), as one plain line with the time so far and an estimate of what is left."""

    def __init__(self, console, lines: PlainLines | None, cells: int, *, done: int = 0):
        self.console = console
        self.lines = lines
        self.start = time.perf_counter()
        self.times: list[tuple[str, float]] = []
        self.done = done  # cells of the grid finished before this call
        self.cells_left = cells  # cells of this call not finished yet, the running one included
        self.cell_seconds: list[float] = []  # the cells finished in this call
        self.cell = ""  # "cell 2/6 " while a cell runs: each line of a log then says where the run is
        self.running = ""  # the running cell's name
        self.cell_start: float | None = None
        self.cell_parts: dict[str, float] = {}  # the running cell's seconds per part (pairs, tune, eval)
        self.measured: dict[str, dict[str, float]] = {}  # the cells finished in this call: part -> seconds
        self.estimate: Estimate | None = None  # the calibrated estimate, if one was made

    def left(self) -> float | None:
        """The time still to go: none before the first cell ends, and none after the last. With an estimate, its
        cells not finished priced by the ones that are (Estimate.remaining); else the mean cell of this call so far
        for each. The running cell counts less the time it has had, but not below zero."""
        if not self.cell_seconds or not self.cells_left:
            return None
        running = self.cell_start is not None
        had = time.perf_counter() - self.cell_start if running else 0.0
        if self.estimate is not None:
            return self.estimate.remaining(self.measured, running=self.running if running else None, running_s=had)
        mean = sum(self.cell_seconds) / len(self.cell_seconds)
        return max(0.0, mean - had) * running + mean * (self.cells_left - running)

    def say(self, text: str) -> None:
        """A line of its own: plain in a log, on the console on a terminal."""
        if self.lines is not None:
            self.lines.line(text, left=self.left())
        else:
            self.console.print(text)

    def start_cell(self, number: str, name: str) -> None:
        self.cell, self.running, self.cell_start, self.cell_parts = f"{number} ", name, time.perf_counter(), {}
        if self.lines is not None:  # on a terminal the bar shows the cell
            self.say(f"{number} {name}: started")

    def end_cell(self, number: str, name: str) -> None:
        dt = time.perf_counter() - self.cell_start
        self.cell_seconds.append(dt)
        self.cells_left -= 1
        self.measured[name] = self.cell_parts
        self.cell, self.running, self.cell_start = "", "", None
        if self.estimate is not None:  # the whole run as it now looks: the time so far and what is left
            total = time.perf_counter() - self.start + (self.left() or 0.0)
            self.estimate.updates.append((self.done + len(self.cell_seconds), total))
            if self.lines is None:
                self.console.print(f"[dim]estimate: about {minutes(total)} in all")
        if self.lines is not None:
            self.say(f"{number} {name}: done in {duration(dt)}")

    @contextmanager
    def __call__(self, name: str, *, part: str | None = None):
        """Times the phase `name`; `part` (pairs, tune, eval) is what of its cell it is, for the estimate."""
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.times.append((name, dt))
        if part is not None and self.cell_start is not None:
            self.cell_parts[part] = self.cell_parts.get(part, 0.0) + dt
        if self.lines is not None:
            self.lines.line(f"{self.cell}{name} done in {duration(dt)}", left=self.left())
        else:
            self.console.print(f"[dim]{name}: {dt:.1f} s")


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


@dataclass
class CellPlan:
    """One cell as the driver hands it to an executor. `data_path` is set once the driver has built its pairs."""

    context: str
    method: str
    seed: int
    number: str  # "cell 3/6": its place in the whole grid
    data_path: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the source context's options, as the pairs used them

    @property
    def name(self) -> str:
        return cell_name(self.context, self.method, self.seed)


def _engine(spec: ExperimentSpec, loaded, say):
    from dpolab.models.backends import chat_model

    return chat_model(loaded, backend=spec.backend, batch_size=spec.probes.batch_size, int8=spec.int8, echo=say)


def _lazy_base(spec: ExperimentSpec, say) -> Callable[[], Any]:
    """The base model's chat engine, loaded on the first call and then kept (`.cache_clear()` lets it go): a resumed
    run whose baseline and pairs exist never loads it."""

    @functools.cache
    def base_chat():
        from dpolab.models.load import load_model

        return _engine(spec, load_model(spec.model), say)

    return base_chat


def _probe_kw(spec: ExperimentSpec, reader: str) -> dict[str, Any]:
    return dict(probes=spec.probes.names, sizes=spec.probes.sizes, limit=spec.probes.limit, stance=reader,
                n_boot=spec.n_boot)


def _build_pairs(spec: ExperimentSpec, out: Path, plan: CellPlan, *, reader: str, base_chat) -> None:
    """The cell's preference pairs, from its (source) context and the base model: on the driver, once per context and
    seed (a cache under OUT/contexts), so every executor's cells read the same files."""
    from dpolab.contexts import build_context
    from dpolab.contexts.placebo import build_placebo, parse_placebo

    placebo = parse_placebo(plan.context)
    source = plan.context if placebo is None else placebo[1]
    plan.options = spec.context_options(source, reader)
    # the spec's options are final: --quick sizes were applied when it was loaded
    data_path = build_context(source, base_chat(), options=plan.options, seed=plan.seed, cache_dir=out / "contexts",
                              model_id=spec.model)
    if placebo is not None:  # the source's own pairs, turned into its control
        data_path = build_placebo(placebo[0], data_path, base_chat(), seed=plan.seed, cache_dir=out / "contexts",
                                  model_id=spec.model)
    plan.data_path = data_path


def _run_cell(spec: ExperimentSpec, out: Path, plan: CellPlan, *, reader: str, base_chat, phases: "_Phases",
              on_phase=lambda text: None, tracking=None) -> None:
    """Tune (train, edit or a registered kind), evaluate, explain and compare one cell whose pairs are built, and write
    its rows.json and cell.json (the latter last: it marks the cell done). The same in every executor.

    tracking: the experiment's ExperimentTracking (dpolab.tracking) or None; the cell gets a run nested under it."""
    context, method, seed, name = plan.context, plan.method, plan.seed, plan.name
    cell_dir = out / "cells" / name
    # a cell cut short starts over, but a method kind's own folder (its finished rounds, stages, samples,
    # checkpoints) is kept: the kind resumes from it
    kind = spec.method_kind(method)
    keep = kind if kind in METHOD_KINDS else None
    for part in cell_dir.iterdir() if cell_dir.exists() else ():
        if part.name != keep:
            shutil.rmtree(part) if part.is_dir() else part.unlink()
    cell_dir.mkdir(parents=True, exist_ok=True)
    cell_run = None if tracking is None else tracking.cell(name, {"context": context, "method": method, "seed": seed,
                                                                  "kind": kind, "data": str(plan.data_path)})
    with cell_run or contextlib.nullcontext():
        _tune_eval_compare(spec, out, plan, kind, reader=reader, base_chat=base_chat, phases=phases,
                           on_phase=on_phase, cell_run=cell_run)


def _tune_eval_compare(spec: ExperimentSpec, out: Path, plan: CellPlan, kind: str, *, reader: str, base_chat,
                       phases: "_Phases", on_phase, cell_run) -> None:
    """_run_cell's work, inside the cell's tracking run (cell_run, or None)."""
    from dpolab.contexts.placebo import parse_placebo
    from dpolab.models.load import load_model
    from dpolab.probes.run import run_eval
    from dpolab.training.loop import train

    context, method, seed, name = plan.context, plan.method, plan.seed, plan.name
    cell_dir = out / "cells" / name
    source = plan.context if parse_placebo(context) is None else parse_placebo(context)[1]
    on_phase(f"{name}: {kind}")
    with phases(f"{name}: {kind}", part="tune"):
        if kind == "train":
            cfg = spec.train_config(context, method, data=str(plan.data_path), out=str(cell_dir / "train"), seed=seed)
            if cell_run is not None:
                cell_run.log_params({"train": cfg.model_dump(mode="json")})
            trained = train(cfg, tracking=cell_run)
            tuned, steps, extra = trained.model, trained.steps, {}
            del trained
        elif kind != "edit":  # a registered kind (dpolab.methods) runs the cell's tuning itself
            result = _kind_cell(spec, kind, context, method, source, plan.options, plan.data_path, cell_dir, seed=seed,
                                base=base_chat(), say=phases.say)
            tuned, steps, extra = result.model, result.steps, {kind: result.info}
            del result
        else:  # the base model's weights edited from the pairs: nothing is trained
            edited = _edit_cell(spec.model, spec.methods[method], plan.data_path, cell_dir / "edit", seed=seed)
            tuned, steps, extra = edited.model, 0, {"edit": edited.report.summary()}
    on_phase(f"{name}: eval")
    with phases(f"{name}: eval", part="eval"):
        loaded = load_model(spec.model)  # tokenizer and identity of the base; weights replaced below
        loaded.model = tuned.eval()
        loaded.name = f"{spec.model} + {context}/{method}/s{seed}"
        summary = run_eval(_engine(spec, loaded, phases.say), out=cell_dir / "eval", seed=0, **_probe_kw(spec, reader))
        if spec.inspect_log:
            from dpolab.probes.inspect_log import write_inspect_log

            write_inspect_log(cell_dir / "eval", cell_dir / "inspect")
    behaviours = spec.contexts[context].explain if parse_placebo(context) is None else {}
    for behaviour, explain_keys in behaviours.items():
        with phases(f"{name}: explain {behaviour}", part="eval"):
            _explain_cell(spec, loaded, behaviour, explain_keys, cell_dir / "explain" / behaviour, say=phases.say)
    baseline = EvalSummary.read(out / "baseline" / "summary.json")
    rows = compare(baseline, summary, per_item_values(out / "baseline"), per_item_values(cell_dir / "eval"),
                   context=context, method=method, seed=seed, n_boot=spec.n_boot)
    atomic_write_json(cell_dir / "rows.json", [r.record() for r in rows])
    atomic_write_json(cell_dir / "cell.json", {"context": context, "method": method, "seed": seed,
                                               "data": str(plan.data_path), "train_steps": steps, "rows": len(rows),
                                               **extra})
    if cell_run is not None:
        cell_run.log_rows(rows)
        cell_run.log_artifacts([cell_dir / "rows.json", cell_dir / "cell.json", cell_dir / "eval" / "summary.json",
                                cell_dir / "train" / "metrics.jsonl", cell_dir / "train" / "config.yaml"])


def run_experiment(spec: ExperimentSpec, out: str | Path, *, resume: bool = False, quick: bool = False, progress: bool = True,
                   stop_after_cells: int | None = None, executor: str = "local", address: str | None = None,
                   estimate: bool = True, log: IO[str] | None = None) -> RunReport:
    """Run the grid of `spec` into `out`; see the module docstring. Returns the rows of results.parquet.

    estimate: before the baseline eval, time the run's parts at small sizes on this machine and say how long the
        whole run should take (dpolab.experiment.estimate), refined after each cell; into timings.json beside the
        actual time. Only with the local executor, whose cells run one after another.

    executor: "local" runs the cells one after another in this process; "ray" runs each cell as a Ray task
        (dpolab.experiment.ray_executor) once this process has run the baseline and built its pairs.
    address: the Ray cluster to join (`ray start --head` prints it); None starts a local one, or uses the one this
        process has already initialised.
    stop_after_cells: end after this many cells have been run in this call (used to test resuming).
    log: where the plain progress lines go when the output is not a terminal (default stdout; the CLI sends them
        to stderr when the summary is printed as markdown, csv or json, so stdout holds only that).
    """
    import torch

    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise ConfigError("--address names a Ray cluster: it needs --executor ray")
    out = Path(out)
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
    tracking = None
    if spec.report_to:
        from dpolab.tracking import open_experiment

        tracking = open_experiment(spec.report_to, out, name=out.resolve().name,
                                   params=spec.model_dump(mode="json", exclude={"quick", "presets"}),
                                   tracking_uri=spec.tracking_uri)
    with tracking or contextlib.nullcontext():
        return _run_grid(spec, out, tracking, quick=quick, progress=progress, stop_after_cells=stop_after_cells,
                         executor=executor, address=address, estimate=estimate, log=log)


def _make_estimate(spec: ExperimentSpec, out: Path, cells: list[tuple[str, str, int]], done: list[tuple[str, str, int]],
                   *, base_chat, phases: _Phases) -> None:
    """Calibrate the estimate of `cells` (those this call runs) on the base model, print it (and, in a log, its
    breakdown) and give it to `phases`. A calibration that fails says so, and the run goes on without one."""
    from dpolab.contexts.placebo import parse_placebo

    base_dir = out / "baseline"
    baseline = EvalSummary.read(base_dir / "summary.json") if (base_dir / "DONE").exists() else None
    built = {(c if parse_placebo(c) is None else parse_placebo(c)[1], s) for c, _, s in done}
    try:
        estimate = calibrate(spec, cells, base=base_chat(), baseline=baseline, built=built)
    except Exception as exc:  # the estimate is a courtesy: it never stops the run it is about
        phases.say(f"estimate: none, the calibration failed ({type(exc).__name__}: {exc})")
        return
    estimate.spent_s = time.perf_counter() - phases.start
    phases.estimate = estimate
    phases.say(estimate.line())
    if phases.lines is not None:
        print("\n".join(estimate.breakdown_lines()), file=phases.lines.stream, flush=True)


def _run_grid(spec: ExperimentSpec, out: Path, tracking, *, quick: bool, progress: bool, stop_after_cells: int | None,
              executor: str, address: str | None, estimate: bool, log: IO[str] | None) -> RunReport:
    from rich.console import Console

    from dpolab.experiment.pool import pool_run
    from dpolab.probes.run import run_eval

    console = Console(stderr=True)
    report = RunReport(out=out, rows=[])
    cells = spec.cells()
    done = [c for c in cells if (out / "cells" / cell_name(*c) / "cell.json").exists()]
    todo = len(cells) - len(done) if stop_after_cells is None else min(stop_after_cells, len(cells) - len(done))
    phases = _Phases(console, None if interactive() else PlainLines(log), cells=todo, done=len(done))
    report.skipped = [cell_name(*c) for c in done]
    if done:
        phases.say(f"resuming: {len(done)} of {len(cells)} cells already finished")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[phase]}"), console=console, disable=not progress or phases.lines is not None)
    t_start = phases.start
    cluster = None
    if executor == "ray" and todo:
        from dpolab.experiment.ray_executor import RayCells

        cluster = RayCells(spec, out, address=address, phases=phases, tracking=tracking)
    try:
        with bar:
            task = bar.add_task("cells", total=len(cells), completed=len(done), phase="baseline")
            base_dir = out / "baseline"
            base_chat = _lazy_base(spec, phases.say)
            if estimate and cluster is None and todo:
                bar.update(task, phase="estimate")
                _make_estimate(spec, out, [c for c in cells if c not in done][:todo], done, base_chat=base_chat,
                               phases=phases)
            if not (base_dir / "DONE").exists():
                with phases("baseline eval"):
                    shutil.rmtree(base_dir, ignore_errors=True)
                    run_eval(base_chat(), out=base_dir, seed=0, **_probe_kw(spec, spec.probes.stance))
                    (base_dir / "DONE").write_text("")
            if spec.inspect_log:  # outside: turning it on for a resumed run still writes the baseline's logs
                from dpolab.probes.inspect_log import write_inspect_log

                write_inspect_log(base_dir, base_dir / "inspect")
            # One stance reader for everything: the baseline's calibrated choice is used by the contexts' pairs and by
            # every later eval, so a trained model can't switch readers and make its numbers incomparable.
            reader = EvalSummary.read(base_dir / "summary.json").stance_reader() or spec.probes.stance

            ran = 0
            for context, method, seed in cells:
                name = cell_name(context, method, seed)
                if (out / "cells" / name / "cell.json").exists():
                    continue
                if stop_after_cells is not None and ran >= stop_after_cells:
                    break
                # numbered in the whole grid, so a resumed run's log goes on from where the last one stopped
                plan = CellPlan(context=context, method=method, seed=seed, number=f"cell {len(done) + ran + 1}/{len(cells)}")
                ran += 1
                if cluster is None:
                    phases.start_cell(plan.number, name)
                bar.update(task, phase=f"{name}: pairs")
                with phases(f"{name}: pairs", part="pairs"):
                    _build_pairs(spec, out, plan, reader=reader, base_chat=base_chat)
                if cluster is None:
                    _run_cell(spec, out, plan, reader=reader, base_chat=base_chat, phases=phases,
                              on_phase=lambda text: bar.update(task, phase=text), tracking=tracking)
                    phases.end_cell(plan.number, name)
                    bar.advance(task)
                else:  # the cell runs on the cluster while this process builds the next cell's pairs
                    cluster.submit(plan, reader=reader)
            if cluster is not None:
                base_chat.cache_clear()  # the driver's copy of the base is not needed while the last cells run
                bar.update(task, phase="cells on Ray")
                cluster.wait_all(on_done=lambda: bar.advance(task))
    finally:
        if cluster is not None:
            cluster.close()

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
    estimated = {} if phases.estimate is None else {"estimate": phases.estimate.to_json()}
    atomic_write_json(out / "timings.json", {"phases": report.phases, "total_s": total, "executor": executor, **estimated})
    from dpolab.report import write_report

    with phases("report"):  # timed for the log only: the report and timings.json cannot hold their own writing
        write_report(out, phases=report.phases)
    if tracking is not None:
        tracking.finish(artifacts=[out / "report.html", out / "results.parquet", out / "results.csv",
                                   out / "results_by_seed.parquet", out / "spec.resolved.yaml", out / "timings.json"],
                        rows=report.rows)
    budget = spec.budgets.quick_minutes if quick else spec.budgets.total_minutes
    said = "" if phases.estimate is None else f"estimated {minutes(phases.estimate.at_start_s)} at start, "
    on = f" on {spec.budgets.cpu}" if spec.budgets.cpu else ""
    console.print(f"wall time {total / 60:.1f} min ({said}budget {budget:g} min{on}) -> {out / 'report.html'}")
    return report
