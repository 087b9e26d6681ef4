"""A run that mirrors itself elsewhere: `report_to` (MLflow, TensorBoard) and `inspect_log` through `dpolab run`
on the tiny model, read back with each tool's own reader."""
from __future__ import annotations

import pytest

from dpolab.experiment.spec import load_spec
from tests.test_run import tiny_spec, write_spec


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(var, "")  # recorded, so that teardown restores the variable as it was
        monkeypatch.delenv(var)


def test_a_run_tracks_its_cells_and_writes_inspect_logs(tmp_path, tiny_model_dir, home):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    pytest.importorskip("inspect_ai")
    import json

    from inspect_ai.log import list_eval_logs, read_eval_log
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dpolab.experiment.runner import run_experiment

    raw = tiny_spec(tiny_model_dir)
    raw["contexts"]["length-biased-judge"]["methods"] = ["dpo"]
    spec = load_spec(write_spec(tmp_path, {**raw, "report_to": ["mlflow", "tensorboard"], "inspect_log": True}))
    out = tmp_path / "run"
    report = run_experiment(spec, out, progress=False)
    cells = [f"{c}__{m}__s{s}" for c, m, s in spec.cells()]

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("dpolab")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("dpolab.role") == "experiment"]
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.html", "results.parquet", "results.csv"}
    nested = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(nested) == sorted(cells)
    for name in cells:
        run = nested[name]
        assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.001"
        # one loss per optimizer step, the same as the cell's metrics.jsonl
        steps = [json.loads(line) for line in (out / "cells" / name / "train" / "metrics.jsonl").read_text().splitlines()]
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(s["step"], pytest.approx(s["loss"])) for s in steps]
        acc = EventAccumulator(str(out / "tensorboard" / name))
        acc.Reload()
        assert [e.step for e in acc.Scalars("loss")] == [s["step"] for s in steps]
    # a pooled row's delta reaches the parent as a metric
    row = next(r for r in report.rows if r.probe == "knowledge" and r.delta is not None)
    key = f"delta/{row.context}/{row.method}/knowledge/{row.metric}"
    assert parent.data.metrics[key] == pytest.approx(row.delta)

    # Inspect: one log per probe for the baseline and for each cell, one sample per item
    for folder in [out / "baseline", *(out / "cells" / name for name in cells)]:
        logs = [read_eval_log(info) for info in list_eval_logs(str(folder / "inspect"))]
        assert sorted(log.eval.task for log in logs) == sorted(spec.probes.names)
        knowledge = next(log for log in logs if log.eval.task == "knowledge")
        assert knowledge.status == "success" and len(knowledge.samples) > 0
