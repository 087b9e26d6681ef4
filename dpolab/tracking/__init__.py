"""Experiment tracking: `report_to: [mlflow, tensorboard]` mirrors a training's or an experiment's numbers into
trackers. TRACKERS names them (a new tracker is one file plus one line); nothing here imports a tracker's package
until a run opens.

    tracking = open_experiment(["mlflow"], out, name="run-x", params=spec.model_dump(mode="json"))
    with tracking.cell("detox__dpo__s0", params) as cell:     # a run nested under the experiment's
        train(cfg, tracking=cell)                              # per-step metrics into the cell's run
        cell.log_rows(rows); cell.log_artifacts([cell_dir / "rows.json"])
    tracking.finish(artifacts=[out / "report.html"], rows=pooled_rows)

A cell may run in another process: `ExperimentTracking.from_dict(tracking.to_dict())` reattaches to the same parent
run by its id. The parent's ids are kept in OUT/tracking.json, so a resumed experiment (or training) goes on in the
same run. Key and param spelling: dpolab.tracking.keys.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Mapping, Protocol, Sequence

from pydantic import BeforeValidator

from dpolab.errors import ConfigError
from dpolab.io import atomic_write_json
from dpolab.registry import Registry
from dpolab.tracking.keys import flatten_params, metric_key, row_metrics, rows_markdown

if TYPE_CHECKING:
    from dpolab.experiment.results import ResultRow

TRACKERS = Registry("tracker", {
    "mlflow": "dpolab.tracking.mlflow_tracker:MLflowTracker",
    "tensorboard": "dpolab.tracking.tensorboard_tracker:TensorBoardTracker",
})
STATE_FILE = "tracking.json"  # in OUT: which runs a resumed experiment or training goes on in
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"  # MLflow's run statuses, used by every tracker


class TrackerRun(Protocol):
    """What a tracker's run offers (MLflowRun, TensorBoardRun). `once`: a training's step, which a resumed training
    may log again (redone after its last checkpoint) and which should then appear once."""

    id: str

    def ref(self) -> dict[str, Any]: ...  # JSON-able; the tracker's reopen / attach take it back
    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int, *, once: bool = False) -> None: ...
    def log_text(self, name: str, text: str) -> None: ...
    def log_artifacts(self, paths: Sequence[Path]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def end(self, status: str) -> None: ...


class Tracker(Protocol):
    """What a tracker registered in TRACKERS offers: a class built as cls(out_dir, tracking_uri=, experiment=) or,
    in another process, cls(out_dir, state=its state()). `package` is what it imports, `install` what pip installs."""

    name: str
    package: str
    install: str

    def state(self) -> dict[str, Any]: ...
    def start(self, name: str, *, role: str, parent: TrackerRun | None = None,
              tags: dict[str, str] | None = None) -> TrackerRun: ...  # role: training, experiment or cell
    def reopen(self, ref: dict[str, Any]) -> TrackerRun | None: ...
    def attach(self, ref: dict[str, Any]) -> TrackerRun: ...


class TrackerMissing(ConfigError):
    """A tracker was asked for whose package is not installed."""


def check_trackers(names: str | Iterable[str] | None) -> list[str]:
    """The tracker names of a config value (a list, or one string, comma-separated allowed), each known, in order,
    once. Raises ConfigError naming the valid ones."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    return list(dict.fromkeys(TRACKERS.check(str(n).strip()) for n in names if str(n).strip()))


def _tracker_names(names: Any) -> list[str]:
    try:
        return check_trackers(names)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None  # pydantic reports it with the key's location


# A config field of tracker names (TrainConfig.report_to, ExperimentSpec.report_to): checked as check_trackers does.
TrackerNames = Annotated[list[str], BeforeValidator(_tracker_names)]


def require(name: str):
    """The tracker class of `name`, once its package is known to be installed."""
    cls = TRACKERS.get(name)
    try:
        found = importlib.util.find_spec(cls.package) is not None
    except (ImportError, ValueError):  # a broken install, or a module blanked out in sys.modules
        found = False
    if not found:
        raise TrackerMissing(f"report_to {name!r} needs the {cls.package} package: pip install {cls.install}")
    return cls


def _status(exc: BaseException | None) -> str:
    if exc is None:
        return FINISHED
    return KILLED if isinstance(exc, (KeyboardInterrupt, SystemExit)) else FAILED


@dataclass
class RunTracking:
    """One run in every tracker asked for: a cell's (nested in its experiment), a standalone training's, or the
    experiment's own. A context manager: leaving it ends the runs, FINISHED, or FAILED / KILLED (Ctrl-C) on an
    exception."""

    runs: dict[str, TrackerRun]  # tracker name -> its run
    ended: bool = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """A nested config, flattened to dotted keys (keys.flatten_params)."""
        flat = flatten_params(params)
        for run in self.runs.values():
            run.log_params(flat)

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One optimizer step's metrics (as metrics.jsonl has them; its `step` is the x axis, not a metric)."""
        values = {metric_key(k): float(v) for k, v in metrics.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for run in self.runs.values():
            run.log_metrics(values, step, once=True)

    def log_rows(self, rows: Sequence["ResultRow"], *, pooled: bool | None = None) -> None:
        """Result rows as metrics at step 0 (keys.row_metrics) and as a table (`results`)."""
        if not rows:
            return
        values = row_metrics(rows, pooled=pooled)
        table = rows_markdown(rows)
        for run in self.runs.values():
            run.log_metrics(values, 0)
            run.log_text("results", table)

    def log_artifacts(self, paths: Iterable[str | Path]) -> None:
        """Files or folders copied into the run (MLflow); missing paths are skipped."""
        paths = [Path(p) for p in paths]
        for run in self.runs.values():
            run.log_artifacts(paths)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for run in self.runs.values():
            run.set_tags({k: str(v) for k, v in tags.items()})

    def end(self, status: str = FINISHED) -> None:
        if not self.ended:
            for run in self.runs.values():
                run.end(status)
            self.ended = True

    def ids(self) -> dict[str, str]:
        """Tracker name -> its run's id (MLflow's run id; TensorBoard's event folder)."""
        return {name: run.id for name, run in self.runs.items()}

    def __enter__(self) -> RunTracking:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(_status(exc))


CellTracking = RunTracking  # what ExperimentTracking.cell returns and train(tracking=...) takes


@dataclass
class ExperimentTracking:
    """An experiment's parent run in every tracker; cells open nested runs under it, in this process or another
    (to_dict / from_dict)."""

    out_dir: Path
    trackers: dict[str, Tracker]  # name -> tracker
    parent: RunTracking

    def cell(self, name: str, params: Mapping[str, Any] | None = None, *, tags: Mapping[str, Any] | None = None) -> RunTracking:
        """A new run for the cell `name`, nested under the experiment's, with its params."""
        runs = {n: t.start(name, role="cell", parent=self.parent.runs[n], tags={k: str(v) for k, v in (tags or {}).items()})
                for n, t in self.trackers.items()}
        cell = RunTracking(runs)
        if params:
            cell.log_params(params)
        return cell

    def log_rows(self, rows: Sequence["ResultRow"]) -> None:
        """The run's pooled rows on the experiment's own run, keyed with their context and method."""
        self.parent.log_rows(rows, pooled=True)

    def finish(self, artifacts: Iterable[str | Path] = (), *, rows: Sequence["ResultRow"] | None = None,
               status: str = FINISHED) -> None:
        """The experiment's rows and files (report.html, results.parquet, results.csv) into its run, which ends."""
        if rows:
            self.log_rows(rows)
        self.parent.log_artifacts(artifacts)
        self.parent.end(status)

    def to_dict(self) -> dict[str, Any]:
        """What another process needs to reattach (ExperimentTracking.from_dict): small, JSON-able."""
        return {"out_dir": str(self.out_dir), "trackers": {n: t.state() for n, t in self.trackers.items()},
                "parents": {n: r.ref() for n, r in self.parent.runs.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentTracking:
        """The same experiment's tracking in this process (a worker): its parent runs attached by id, not restarted."""
        out = Path(data["out_dir"])
        trackers = {n: require(n)(out, state=state) for n, state in data["trackers"].items()}
        parent = RunTracking({n: t.attach(data["parents"][n]) for n, t in trackers.items()})
        return cls(out_dir=out, trackers=trackers, parent=parent)

    def __reduce__(self):  # pickled (a Ray task's argument) as its dict: clients and writers stay behind
        return (ExperimentTracking.from_dict, (self.to_dict(),))

    def __enter__(self) -> ExperimentTracking:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.parent.ended:
            self.parent.end(_status(exc))


def _saved_state(out_dir: Path) -> dict[str, Any]:
    path = out_dir / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _open_runs(report_to, out_dir: Path, *, name: str, role: str, tracking_uri: str | None, experiment: str | None,
               reuse: bool, tags: Mapping[str, Any] | None) -> tuple[dict[str, Any], RunTracking]:
    """The trackers and their top-level run: the one in OUT/tracking.json when `reuse` and its store still holds
    it, else a new one. OUT/tracking.json then names the runs."""
    names = check_trackers(report_to)
    classes = {n: require(n) for n in names}  # every package checked before any run starts
    saved = _saved_state(out_dir) if reuse else {}
    trackers, runs = {}, {}
    for n, cls in classes.items():
        tracker = cls(out_dir, tracking_uri=tracking_uri, experiment=experiment)
        before = saved.get("runs", {}).get(n)
        same_store = saved.get("trackers", {}).get(n) == tracker.state()
        run = tracker.reopen(before) if before and same_store else None
        trackers[n] = tracker
        runs[n] = run or tracker.start(name, role=role, tags={k: str(v) for k, v in (tags or {}).items()})
    atomic_write_json(out_dir / STATE_FILE, {"trackers": {n: t.state() for n, t in trackers.items()},
                                             "runs": {n: r.ref() for n, r in runs.items()}})
    return trackers, RunTracking(runs)


def open_experiment(report_to: str | Iterable[str], out_dir: str | Path, *, name: str, params: Mapping[str, Any],
                    tracking_uri: str | None = None, experiment: str | None = None) -> ExperimentTracking:
    """The experiment's parent run in each tracker of `report_to`, with the resolved spec as params. A rerun into the
    same OUT (--resume) goes on in the parent run named in OUT/tracking.json.

    tracking_uri: MLflow's store (default: $MLFLOW_TRACKING_URI, else OUT/mlruns).
    experiment: MLflow's experiment name (default: $MLFLOW_EXPERIMENT_NAME, else "dpolab").
    """
    out_dir = Path(out_dir)
    trackers, parent = _open_runs(report_to, out_dir, name=name, role="experiment", tracking_uri=tracking_uri,
                                  experiment=experiment, reuse=True, tags={"dpolab.out": out_dir.resolve()})
    parent.log_params(params)
    return ExperimentTracking(out_dir=out_dir, trackers=trackers, parent=parent)


def open_training(report_to: str | Iterable[str], out_dir: str | Path, *, params: Mapping[str, Any],
                  tracking_uri: str | None = None, resume: bool = False, experiment: str | None = None) -> RunTracking:
    """A standalone training's run (`dpolab train --report-to ...`): params = its resolved config. resume: go on in
    the run named in OUT/tracking.json (steps already logged are not logged twice)."""
    out_dir = Path(out_dir)
    _, run = _open_runs(report_to, out_dir, name=out_dir.resolve().name, role="training", tracking_uri=tracking_uri,
                        experiment=experiment, reuse=resume, tags={"dpolab.out": out_dir.resolve()})
    run.log_params(params)
    return run


__all__ = ["TRACKERS", "CellTracking", "ExperimentTracking", "RunTracking", "Tracker", "TrackerMissing", "TrackerRun",
           "TrackerNames", "check_trackers", "open_experiment", "open_training"]
