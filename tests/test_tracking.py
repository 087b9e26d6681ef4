"""Tracking: a training and an experiment recorded in MLflow and TensorBoard, read back with their own readers
(MlflowClient, EventAccumulator); names checked at load; keys MLflow accepts."""
from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys

import pytest

from dpolab.config import TrainConfig, load_config
from dpolab.errors import ConfigError
from dpolab.tracking import TRACKERS, ExperimentTracking, TrackerMissing, check_trackers, open_experiment
from dpolab.tracking.keys import MAX_PARAM_VALUE, flatten_params, metric_key, row_metrics, unique_keys
from tests.test_experiment import result_row
from tests.test_train import pairs_file, persuasion_rows  # noqa: F401  (pairs_file is a fixture)


def _installed(package: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


needs_trackers = pytest.mark.skipif(not (_installed("mlflow") and _installed("tensorboard")),
                                    reason="needs mlflow-skinny and tensorboard")


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """A fresh DPOLAB_HOME; no MLflow settings from outside, and none left behind (dpolab allows MLflow's file store
    by setting MLFLOW_ALLOW_FILE_STORE in its own process)."""
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(var, "")  # recorded, so that teardown restores the variable as it was
        monkeypatch.delenv(var)


def _client(out):
    mlflow = pytest.importorskip("mlflow")  # noqa: F841
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())


def _runs(client, **filters):
    """Every run of the dpolab experiment, oldest first."""
    exp = client.get_experiment_by_name("dpolab")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in filters.items())]


def _scalars(logdir, tag):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _train(tiny_model_dir, data, out, **kw):
    from dpolab.training.loop import train

    opts = dict(model=str(tiny_model_dir), data=str(data), out=str(out), batch_size=4, max_steps=3, lr=1e-3,
                progress=False, save_model=False)
    return train(**{**opts, **kw})


# --- names ---------------------------------------------------------------------------------------------------------

def test_importing_dpolab_imports_no_tracker_package():
    code = ("import sys, dpolab.cli, dpolab.tracking, dpolab.training.loop, dpolab.experiment.spec;"
            "print(sorted(m for m, mod in sys.modules.items() if mod is not None and (m.split('.')[0] in ('mlflow', 'tensorboard')"
            " or m.startswith('torch.utils.tensorboard'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_tracker_lists_the_valid_ones_at_load():
    with pytest.raises(ConfigError, match=r"unknown tracker 'mlfow' \(did you mean 'mlflow'\?\); choose from mlflow, tensorboard"):
        check_trackers(["mlfow"])
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        load_config(TrainConfig, None, {"report_to": ["tensorbord"]})
    assert load_config(TrainConfig, None, {"report_to": "mlflow,tensorboard,mlflow"}).report_to == ["mlflow", "tensorboard"]
    assert TrainConfig().report_to == []
    for name in TRACKERS.names():  # the help text names every tracker
        assert name in TrainConfig.model_fields["report_to"].description


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    missing = {"mlflow", "tensorboard"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(TrackerMissing, match="report_to 'mlflow' needs the mlflow package: pip install mlflow-skinny"):
        open_experiment(["mlflow", "tensorboard"], tmp_path, name="x", params={})
    with pytest.raises(TrackerMissing, match="report_to 'tensorboard' needs the tensorboard package: pip install tensorboard"):
        open_experiment(["tensorboard"], tmp_path, name="x", params={})
    assert not (tmp_path / "tracking.json").exists()  # checked before any run started


def test_spec_takes_trackers_at_the_top_and_keeps_its_fingerprint():
    from dpolab.experiment.spec import ExperimentSpec

    base = {"model": "m", "contexts": {"detox": {}}}
    plain = load_config(ExperimentSpec, None, base)
    tracked = load_config(ExperimentSpec, None, {**base, "report_to": ["mlflow", "tensorboard"], "tracking_uri": "file:/x"})
    assert tracked.report_to == ["mlflow", "tensorboard"] and tracked.fingerprint() == plain.fingerprint()
    with pytest.raises(ConfigError, match="choose from mlflow, tensorboard"):
        load_config(ExperimentSpec, None, {**base, "report_to": ["wandb"]})
    with pytest.raises(ConfigError, match="report_to apply to the whole run; set them at the top of the spec"):
        load_config(ExperimentSpec, None, {**base, "train": {"report_to": ["mlflow"]}})


# --- keys ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, key", [
    ("neg_acc@3|domain=knowledge", "neg_acc_at3.domain-knowledge"),
    ("balance:uptake:helpful", "balance.uptake.helpful"),
    ("rewards/chosen", "rewards/chosen"),
    ("a//b/", "a/b"),
    ("../x", "_/x"),
    ("toxicity (mean) %", "toxicity__mean___"),
])
def test_metric_keys(name, key):
    assert metric_key(name) == key


def test_keys_and_params_pass_mlflows_own_checks():
    pytest.importorskip("mlflow")
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    names = ["neg_acc@3|domain=knowledge", "a|b", "a:b", "x" * 400, "café/µ", "/lead", "."]
    keys = unique_keys(names)
    assert len(set(keys.values())) == len(names)  # a|b and a:b both map to a.b: kept apart by a hash suffix
    for key in keys.values():
        _validate_metric_name(key)
    params = flatten_params({"loss_args": {"alpha": 0.5}, "seeds": [0, 1], "lora_targets": "all-linear",
                             "empty": {}, "none": None, "long": "y" * 7000, "odd key!": 1})
    assert params["loss_args.alpha"] == "0.5" and params["seeds"] == "[0, 1]" and params["empty"] == "{}"
    assert params["none"] == "null" and params["odd_key_"] == "1"
    assert len(params["long"]) == MAX_PARAM_VALUE and params["long"].endswith("[truncated: 7000 characters in all]")
    for key in params:
        _validate_param_name(key)


def test_row_metrics_keys_fields_and_verdicts():
    from dpolab.stats import Verdict

    row = result_row(context="shuffled:detox", method="dpo", seed=0, probe="persuasion", metric="neg_acc@3|domain=knowledge",
                     value=0.5, delta=-0.1, delta_ci_low=-0.2, delta_ci_high=0.0, n=24, verdict=Verdict.HARMED,
                     p_value=float("nan"))
    cell = row_metrics([row])
    assert cell["value/persuasion/neg_acc_at3.domain-knowledge"] == 0.5
    assert cell["delta/persuasion/neg_acc_at3.domain-knowledge"] == -0.1
    assert cell["n/persuasion/neg_acc_at3.domain-knowledge"] == 24
    assert cell["verdict/persuasion/neg_acc_at3.domain-knowledge"] == -1.0
    assert not any(k.startswith(("p_value/", "seed")) for k in cell)  # NaN and the cell's coordinates are no metrics
    pooled = row_metrics([row.model_copy(update={"seed": None})])
    assert pooled["delta/shuffled.detox/dpo/persuasion/neg_acc_at3.domain-knowledge"] == -0.1


# --- a training ----------------------------------------------------------------------------------------------------

@needs_trackers
def test_training_recorded_in_mlflow_and_tensorboard(tiny_model_dir, pairs_file, tmp_path):  # noqa: F811
    out = tmp_path / "o"
    result = _train(tiny_model_dir, pairs_file, out, report_to=["mlflow", "tensorboard"], save_model=True)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3] and result.steps == 3

    client = _client(out)
    (run,) = _runs(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "o"
    assert run.data.params["loss"] == "dpo" and float(run.data.params["lr"]) == 1e-3
    assert run.data.params["report_to"] == '["mlflow", "tensorboard"]' and run.data.params["beta"] == "0.1"
    assert run.data.tags["dpolab.model"] == str((out / "model").resolve())
    for key in ("loss", "rewards/margins", "grad_norm", "lr", "epoch"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(m["step"], m[key]) for m in logged]
        scalars = _scalars(out / "tensorboard", key)
        assert [s for s, _ in scalars] == [1, 2, 3]
        assert [v for _, v in scalars] == pytest.approx([m[key] for m in logged], rel=1e-6)  # float32 in events
    assert "step" not in client.get_run(run.info.run_id).data.metrics
    assert json.loads((out / "tracking.json").read_text())["runs"]["mlflow"]["run_id"] == run.info.run_id


@needs_trackers
def test_resumed_training_goes_on_in_its_run_without_logging_a_step_twice(tiny_model_dir, pairs_file, tmp_path):  # noqa: F811
    """Step 3 ran, but the last checkpoint is step 2's (as when a run is killed): the resumed run redoes step 3."""
    out = tmp_path / "o"
    _train(tiny_model_dir, pairs_file, out, max_steps=3, save_every=2, final_checkpoint=False,
           report_to=["mlflow", "tensorboard"])
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    _train(tiny_model_dir, pairs_file, out, resume=out, max_steps=4)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in first] == [1, 2, 3] and [m["step"] for m in logged] == [1, 2, 3, 4]
    client = _client(out)
    (run,) = _runs(client)
    assert run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in history] == [1, 2, 3, 4]  # step 3 once
    assert [v for _, v in history] == pytest.approx([m["loss"] for m in logged], rel=1e-6)
    scalars = _scalars(out / "tensorboard", "loss")
    assert [s for s, _ in scalars] == [1, 2, 3, 4]
    assert [v for _, v in scalars] == pytest.approx([m["loss"] for m in logged], rel=1e-6)


@needs_trackers
@pytest.mark.parametrize("error, status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_training_that_stops_ends_its_run_so(tiny_model_dir, pairs_file, tmp_path, error, status):  # noqa: F811
    def stop(step, metrics):
        raise error("stop")

    with pytest.raises(error):
        _train(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=2, report_to=["mlflow"], on_step=stop)
    (run,) = _runs(_client(tmp_path / "o"))
    assert run.info.status == status and [m.step for m in _client(tmp_path / "o").get_metric_history(run.info.run_id, "loss")] == [1]


@needs_trackers
def test_train_command_takes_report_to(tiny_model_dir, pairs_file, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from dpolab.cli import app

    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--out", str(out),
                                      "--max-steps", "1", "--batch-size", "4", "--set", "progress=false",
                                      "--set", "save_model=false", "--report-to", "mlflow", "--report-to", "tensorboard"])
    assert result.exit_code == 0, result.output
    (run,) = _runs(_client(out))
    assert [m.step for m in _client(out).get_metric_history(run.info.run_id, "loss")] == [1]
    assert [s for s, _ in _scalars(out / "tensorboard", "loss")] == [1]
    bad = CliRunner().invoke(app, ["train", "--data", str(pairs_file), "--out", str(tmp_path / "b"), "--report-to", "mlfow"])
    assert bad.exit_code != 0 and "did you mean 'mlflow'" in " ".join(str(bad.exception or bad.output).split())


# --- an experiment -------------------------------------------------------------------------------------------------

CELL_IN_ANOTHER_PROCESS = """
import json, sys
from dpolab.tracking import ExperimentTracking
tracking = ExperimentTracking.from_dict(json.loads(sys.argv[1]))
with tracking.cell("detox__dpo__s1", {"train": {"lr": 2e-5}, "seed": 1}) as cell:
    for step in (1, 2):
        cell.log_step(step, {"step": step, "loss": 0.5 / step})
print(json.dumps(cell.ids()))
"""


@needs_trackers
def test_experiment_parent_nested_cells_rows_artefacts_and_resume(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.html").write_text("<html></html>")
    (out / "results.csv").write_text("probe,metric\n")
    spec = {"model": "m", "seeds": [0, 1], "contexts": {"detox": {"options": {"k": 4}}}, "presets": {}}
    tracking = open_experiment(["mlflow", "tensorboard"], out, name="run", params=spec)

    row = result_row(context="detox", method="dpo", seed=0, probe="persuasion", metric="neg_acc@3|domain=knowledge",
                     value=0.5, delta=-0.1, delta_ci_low=-0.2, delta_ci_high=0.0)
    (out / "rows.json").write_text(json.dumps([row.record()]))
    with tracking.cell("detox__dpo__s0", {"train": {"lr": 1e-5, "loss": "dpo"}, "seed": 0}) as cell:
        cell.log_step(1, {"step": 1, "loss": 0.69, "rewards/margins": 0.0})
        cell.log_rows([row])
        cell.log_artifacts([out / "rows.json", out / "missing.json"])

    # another process reattaches by the dict alone (as a Ray task would) and opens the second cell
    state = json.loads(json.dumps(tracking.to_dict()))
    done = subprocess.run([sys.executable, "-c", CELL_IN_ANOTHER_PROCESS, json.dumps(state)], capture_output=True,
                          text=True, check=True)
    other_ids = json.loads(done.stdout.strip().splitlines()[-1])
    assert pickle.loads(pickle.dumps(tracking)).parent.ids() == tracking.parent.ids()

    pooled = row.model_copy(update={"seed": None, "seeds": 2})
    tracking.finish(artifacts=[out / "report.html", out / "results.csv"], rows=[pooled])

    client = _client(out)
    (parent,) = _runs(client, **{"dpolab.role": "experiment"})
    assert parent.info.status == "FINISHED" and parent.info.run_id == tracking.parent.ids()["mlflow"]
    assert parent.data.params["seeds"] == "[0, 1]" and parent.data.params["contexts.detox.options.k"] == "4"
    assert parent.data.params["presets"] == "{}"
    assert parent.data.metrics["delta/detox/dpo/persuasion/neg_acc_at3.domain-knowledge"] == -0.1
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.html", "results.csv", "results.md"}

    cells = _runs(client, **{"mlflow.parentRunId": parent.info.run_id})
    assert [c.info.run_name for c in cells] == ["detox__dpo__s0", "detox__dpo__s1"]
    assert all(c.info.status == "FINISHED" for c in cells) and cells[1].info.run_id == other_ids["mlflow"]
    first, second = cells
    assert first.data.params["train.lr"] == "1e-05" and first.data.params["seed"] == "0"
    assert first.data.metrics["delta/persuasion/neg_acc_at3.domain-knowledge"] == -0.1
    assert first.data.metrics["verdict/persuasion/neg_acc_at3.domain-knowledge"] == 0.0
    assert [(m.step, m.value) for m in client.get_metric_history(first.info.run_id, "rewards/margins")] == [(1, 0.0)]
    assert {a.path for a in client.list_artifacts(first.info.run_id)} == {"rows.json", "results.md"}
    assert sorted((m.step, m.value) for m in client.get_metric_history(second.info.run_id, "loss")) == [(1, 0.5), (2, 0.25)]

    tb = out / "tensorboard"
    assert _scalars(tb / "detox__dpo__s0", "loss") == [(1, pytest.approx(0.69))]
    assert _scalars(tb / "detox__dpo__s1", "loss") == [(1, 0.5), (2, 0.25)]
    assert _scalars(tb / "detox__dpo__s0", "delta/persuasion/neg_acc_at3.domain-knowledge") == [(0, pytest.approx(-0.1))]
    assert _scalars(tb / "experiment", "delta/detox/dpo/persuasion/neg_acc_at3.domain-knowledge") == [(0, pytest.approx(-0.1))]

    # --resume: the same parent run goes on; a cell that starts over leaves its interrupted run KILLED
    again = open_experiment(["mlflow", "tensorboard"], out, name="run", params=spec)
    assert again.parent.ids() == tracking.parent.ids()
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"
    killed = again.cell("detox__dpo__s2", {})  # its process "dies": the run is never ended
    with again.cell("detox__dpo__s2", {}) as cell:
        cell.log_step(1, {"loss": 0.1})
    again.finish()
    assert len(_runs(client, **{"dpolab.role": "experiment"})) == 1
    assert client.get_run(killed.ids()["mlflow"]).info.status == "KILLED"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@needs_trackers
def test_a_failing_experiment_marks_its_runs(tmp_path):
    pytest.importorskip("mlflow")
    with pytest.raises(ValueError):
        with open_experiment(["mlflow"], tmp_path, name="x", params={}) as tracking:
            with tracking.cell("c", {}):
                raise ValueError("cell broke")
    client = _client(tmp_path)
    assert {r.info.status for r in _runs(client)} == {"FAILED"}
    assert isinstance(ExperimentTracking.from_dict(tracking.to_dict()), ExperimentTracking)


@needs_trackers
def test_tracking_uri_option_and_environment(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    open_experiment(["mlflow"], tmp_path / "a", name="a", params={}).finish()
    explicit = tmp_path / "explicit"
    open_experiment(["mlflow"], tmp_path / "b", name="b", params={}, tracking_uri=str(explicit)).finish()
    assert not (tmp_path / "a" / "mlruns").exists() and not (tmp_path / "b" / "mlruns").exists()
    for where, name in ((store, "a"), (explicit, "b")):
        exp = MlflowClient(tracking_uri=where.as_uri()).get_experiment_by_name("dpolab")
        (run,) = MlflowClient(tracking_uri=where.as_uri()).search_runs([exp.experiment_id])
        assert run.info.run_name == name and math.isfinite(run.info.end_time)


@needs_trackers
def test_a_cell_passes_its_run_to_the_trainer(tiny_model_dir, pairs_file, tmp_path):  # noqa: F811
    """As the runner does: the cell's nested run takes the training's steps; train() opens none of its own and
    leaves the cell's run for the cell to end."""
    out = tmp_path / "run"
    tracking = open_experiment(["mlflow", "tensorboard"], out, name="run", params={"model": "m"})
    with tracking.cell("detox__dpo__s0", {"context": "detox", "seed": 0}) as cell:
        _train(tiny_model_dir, pairs_file, out / "cells" / "detox__dpo__s0" / "train", max_steps=2, tracking=cell,
               save_model=True)
        client = _client(out)
        assert client.get_run(cell.ids()["mlflow"]).info.status == "RUNNING"
        cell.log_params({"train": {"lr": 1e-3, "loss": "dpo"}})
    tracking.finish()
    train_out = out / "cells" / "detox__dpo__s0" / "train"
    assert not (train_out / "mlruns").exists() and not (train_out / "tracking.json").exists()
    logged = [json.loads(line) for line in (train_out / "metrics.jsonl").read_text().splitlines()]
    run = client.get_run(cell.ids()["mlflow"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == tracking.parent.ids()["mlflow"]
    assert run.data.params["train.loss"] == "dpo" and run.data.tags["dpolab.model"] == str((train_out / "model").resolve())
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(m["step"], m["loss"]) for m in logged]
    assert [s for s, _ in _scalars(out / "tensorboard" / "detox__dpo__s0", "loss")] == [1, 2]
