"""The Ray executor of `dpolab run --executor ray`: each cell of the grid as a Ray task.

The driver (the process that calls `run_experiment`) runs the baseline eval and builds every cell's preference pairs,
once, as the local executor does; each task then tunes, evaluates and compares its cell and writes the cell's folder.
A cell's task starts as soon as its pairs exist, so the cluster works while the driver builds the next pairs.

Storage: the run folder must be at the same path on the driver and on every worker (one machine, or a shared
filesystem such as NFS). A task writes only under OUT/cells/<cell>/ and returns its phase times; the model cache
($DPOLAB_HOME) is each machine's own. A worker that dies, or a cell that raises, loses only that cell: the other
cells finish, the run ends with an error naming the failed ones, and `--resume` (with either executor) runs them
again, since a cell counts as done only once its cell.json is written.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dpolab.errors import ConfigError, RunError
from dpolab.progress import duration

if TYPE_CHECKING:
    from dpolab.experiment.runner import CellPlan, _Phases
    from dpolab.experiment.spec import ExperimentSpec

# Passed to the workers when set here: where the converted models live, and the offline switches.
PASSED_ENV = ("DPOLAB_HOME", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH")


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'ray==2.60.0' (or choose --executor local)") from None
    return ray


def _cell_task(spec: "ExperimentSpec", out: str, plan: "CellPlan", reader: str,
               tracking: dict | None) -> list[tuple[str, float]]:
    """One cell on a Ray worker: the same `_run_cell` as the local executor; returns the cell's phase times.
    tracking: the experiment's ExperimentTracking.to_dict(), reattached here so the cell's run nests under it."""
    import torch
    from rich.console import Console

    from dpolab.experiment.runner import _lazy_base, _Phases, _run_cell
    from dpolab.progress import PlainLines

    folder = Path(out)
    if not (folder / "experiment.json").exists():
        raise ConfigError(f"the run folder {folder} is not visible on worker {platform.node()}: the ray executor needs "
                          "it at the same path on every worker (a shared filesystem)")
    torch.set_num_threads(spec.threads or max(1, int(spec.resources.cpus)))
    phases = _Phases(Console(stderr=True), PlainLines(), cells=1)
    if tracking is not None:
        from dpolab.tracking import ExperimentTracking

        tracking = ExperimentTracking.from_dict(tracking)
    _run_cell(spec, folder, plan, reader=reader, base_chat=_lazy_base(spec, phases.say), phases=phases, tracking=tracking)
    return phases.times


def _why(exc: BaseException) -> str:
    """The first line of what went wrong in the task (its own exception, not Ray's wrapper and traceback)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


class RayCells:
    """The cells submitted to a Ray cluster, and their collection as they end."""

    def __init__(self, spec: "ExperimentSpec", out: Path, *, address: str | None, phases: "_Phases", tracking=None):
        ray = _ray()
        self.spec, self.out, self.phases = spec, Path(out), phases
        self.tracking = None if tracking is None else tracking.to_dict()
        self.started = False  # whether this object started (and so shuts down) the Ray runtime
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
            ray.init(address=address, runtime_env={"env_vars": env} if env else None, include_dashboard=False,
                     log_to_driver=True)
            self.started = True
        res = spec.resources
        self.remote = ray.remote(_cell_task).options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=res.retries)
        self.pending: dict = {}  # ObjectRef -> (CellPlan, submit time)
        self.failed: list[tuple["CellPlan", str]] = []
        cluster = ray.cluster_resources()
        phases.say(f"ray: {cluster.get('CPU', 0):g} CPU(s), {cluster.get('GPU', 0):g} GPU(s) in the cluster; each cell "
                   f"asks for {res.cpus:g} CPU(s) and {res.gpus:g} GPU(s)")

    def submit(self, plan: "CellPlan", *, reader: str) -> None:
        ref = self.remote.remote(self.spec, str(self.out), plan, reader, self.tracking)
        self.pending[ref] = (plan, time.perf_counter())
        self.phases.say(f"{plan.number} {plan.name}: submitted to ray")

    def wait_all(self, *, on_done: Callable[[], None]) -> None:
        """Collect every submitted cell as it ends; raise RunError naming the failed cells once all have ended."""
        ray = _ray()
        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1)
            for ref in ready:
                plan, t0 = self.pending.pop(ref)
                try:
                    times = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self.failed.append((plan, _why(exc)))
                    self.phases.say(f"{plan.number} {plan.name}: failed: {_why(exc)}")
                    continue
                self.phases.times.extend(times)
                self.phases.say(f"{plan.number} {plan.name}: done in {duration(time.perf_counter() - t0)} (queued "
                                "and run on ray)")
                on_done()
        if self.failed:
            names = "; ".join(f"{plan.name} ({why})" for plan, why in self.failed)
            raise RunError(f"{len(self.failed)} cell(s) failed on ray: {names}. The finished cells are kept in "
                           f"{self.out}; run again with --resume to run the failed ones")

    def close(self) -> None:
        """Cancel what is still queued or running (an interrupted driver), and stop a Ray runtime this object started."""
        ray = _ray()
        for ref in list(self.pending):
            ray.cancel(ref, force=True)
        self.pending.clear()
        if self.started:
            ray.shutdown()
