"""The MLflow tracker: runs in a tracking store through MlflowClient and explicit run ids (no active-run stack), so a
run started in one process takes nested runs from another.

The store: the `tracking_uri` option, else $MLFLOW_TRACKING_URI, else a file store in OUT/mlruns. MLflow 3 refuses
its file store unless MLFLOW_ALLOW_FILE_STORE is true (its default is sqlite, which needs sqlalchemy, absent from
mlflow-skinny); for a `file:` store dpolab sets that variable in its own process when it is unset.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nesting; its UI draws the tree from it
_PARAMS_PER_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
_METRICS_PER_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH


def resolve_uri(tracking_uri: str | None, out_dir: Path) -> str:
    """The store's URI: the option, the environment's, or OUT/mlruns; a plain path becomes an absolute file: URI (a
    worker process in another folder must find the same store)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or str(Path(out_dir) / "mlruns")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") and not parsed.netloc:
        uri = Path(parsed.path if parsed.scheme else uri).resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


class MLflowRun:
    """One MLflow run, addressed by its id."""

    def __init__(self, client, run_id: str, *, reopened: bool = False):
        self.client, self.id = client, run_id
        self._logged: dict[str, int] | None = {} if reopened else None  # key -> last step already in the store

    def ref(self) -> dict[str, Any]:
        return {"run_id": self.id}

    def log_params(self, params: dict[str, str]) -> None:
        """Params are write-once in MLflow: a reopened run keeps those it has and gains the new keys only."""
        from mlflow.entities import Param

        have = self.client.get_run(self.id).data.params if self._logged is not None else {}
        items = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.id, params=items[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int, *, once: bool = False) -> None:
        """once: in a reopened run (a resumed training), a step already in the store is not logged again: a resumed
        run redoes the steps after its last checkpoint, with the same values."""
        from mlflow.entities import Metric

        if once and self._logged is not None:
            for key in metrics.keys() - self._logged.keys():
                history = self.client.get_metric_history(self.id, key)
                self._logged[key] = max((m.step for m in history), default=-1)
            metrics = {k: v for k, v in metrics.items() if step > self._logged[k]}
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(self.id, metrics=items[i : i + _METRICS_PER_BATCH])

    def log_text(self, name: str, text: str) -> None:
        self.client.log_text(self.id, text, f"{name}.md")

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for path in map(Path, paths):
            if path.is_dir():
                self.client.log_artifacts(self.id, str(path), artifact_path=path.name)
            elif path.is_file():
                self.client.log_artifact(self.id, str(path))

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.id, k, v)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.id, status=status)


class MLflowTracker:
    """A connection to one tracking store and one MLflow experiment."""

    name = "mlflow"
    package = "mlflow"
    install = "mlflow-skinny"

    def __init__(self, out_dir: Path, *, tracking_uri: str | None = None, experiment: str | None = None,
                 state: dict[str, Any] | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = state["tracking_uri"] if state else resolve_uri(tracking_uri, out_dir)
        if state:
            resolve_uri(self.uri, out_dir)  # a worker process: allow the file store here too
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = state["experiment_id"] if state else self._experiment(
            experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dpolab")

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another process made it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def state(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id}

    def start(self, name: str, *, role: str, parent: MLflowRun | None = None, tags: dict[str, str] | None = None) -> MLflowRun:
        """A new run; role "cell" nests it under `parent`. An earlier run of the same cell that never ended (its
        process was killed) is marked KILLED: the cell starts over."""
        tags = {**(tags or {}), "dpolab.role": role}
        if parent is not None:
            tags[PARENT_TAG] = parent.id
            stale = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent.id}' and attributes.run_name = "
                f"'{name}' and attributes.status = 'RUNNING'")
            for run in stale:
                self.client.set_terminated(run.info.run_id, status="KILLED")
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return MLflowRun(self.client, run.info.run_id)

    def reopen(self, ref: dict[str, Any]) -> MLflowRun | None:
        """The run of `ref` running again (a resumed experiment or training), or None when this store lacks it."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(ref["run_id"])
        except MlflowException:
            return None
        if run.info.experiment_id != self.experiment_id or run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        return MLflowRun(self.client, run.info.run_id, reopened=True)

    def attach(self, ref: dict[str, Any]) -> MLflowRun:
        """The run of `ref` as it is (another process's handle on a running parent)."""
        return MLflowRun(self.client, ref["run_id"])
