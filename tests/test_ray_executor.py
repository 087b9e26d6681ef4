"""`dpolab run --executor ray` on a local Ray cluster started by the test: the same results as the local executor,
resuming across the two, and a failed cell that loses only itself."""
from __future__ import annotations

import json

import pytest

from dpolab.errors import ConfigError, RunError
from dpolab.experiment.spec import load_spec
from tests.test_run import tiny_spec, write_spec

ray = pytest.importorskip("ray")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))


@pytest.fixture
def cluster(home):
    """A local Ray cluster of 2 CPUs, started after DPOLAB_HOME is set so its workers inherit it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024**2)
    yield
    ray.shutdown()


def _spec(tmp_path, model_dir, **extra):
    # one torch thread in both executors: the same reductions in the same order, so the same numbers
    return load_spec(write_spec(tmp_path, {**tiny_spec(model_dir), "threads": 1, "resources": {"cpus": 1}, **extra}))


def _cells(out) -> dict[str, list[dict]]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/rows.json"))}


def _results(out):
    import pandas as pd

    frame = pd.read_parquet(out / "results.parquet")
    return frame.sort_values(["context", "method", "probe", "metric"]).reset_index(drop=True)


def _same_results(a, b) -> None:
    """The pooled results of two runs are the same numbers, exactly (NaN where one has NaN)."""
    import pandas as pd

    pd.testing.assert_frame_equal(_results(a), _results(b), check_exact=True)


def test_resources_choose_where_cells_run_not_what_they_compute(tmp_path, tiny_model_dir):
    base = _spec(tmp_path, tiny_model_dir)
    other = _spec(tmp_path, tiny_model_dir, resources={"cpus": 4, "gpus": 1, "retries": 0})
    assert (other.resources.cpus, other.resources.gpus) == (4, 1)
    assert other.fingerprint() == base.fingerprint()  # a run resumes under another request or executor
    with pytest.raises(ConfigError, match="resources"):
        _spec(tmp_path, tiny_model_dir, resources={"cpu": 2})


def test_bad_executor_options_are_refused(tmp_path, tiny_model_dir):
    from dpolab.experiment.runner import run_experiment

    spec = _spec(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match="unknown executor 'rey'; choose from local, ray"):
        run_experiment(spec, tmp_path / "a", executor="rey", progress=False)
    with pytest.raises(ConfigError, match="needs --executor ray"):
        run_experiment(spec, tmp_path / "b", address="127.0.0.1:6379", progress=False)


def test_ray_gives_the_local_results_and_resumes_across_executors(tmp_path, tiny_model_dir, cluster):
    from dpolab.experiment.runner import run_experiment

    spec = _spec(tmp_path, tiny_model_dir)
    local, on_ray, mixed = tmp_path / "local", tmp_path / "ray", tmp_path / "mixed"
    run_experiment(spec, local, progress=False)
    run_experiment(spec, on_ray, progress=False, executor="ray")
    assert json.loads((on_ray / "timings.json").read_text())["executor"] == "ray"
    assert len(_cells(local)) == len(spec.cells()) == 3
    # every cell's rows (values, per-seed intervals) and the pooled results are the same numbers
    assert _cells(on_ray) == _cells(local)
    _same_results(on_ray, local)

    # one cell here, the rest on ray with --resume; then nothing left to do, back on the local executor
    run_experiment(spec, mixed, progress=False, stop_after_cells=1)
    report = run_experiment(spec, mixed, resume=True, progress=False, executor="ray")
    assert report.skipped == ["resist-only__dpo__s0"]
    assert _cells(mixed) == _cells(local)
    again = run_experiment(spec, mixed, resume=True, progress=False)
    assert len(again.skipped) == 3
    _same_results(mixed, local)


def test_a_failing_cell_loses_only_itself(tmp_path, tiny_model_dir, cluster, capsys):
    """A learning rate that makes the loss non-finite fails its cell on the worker; the other cells finish and are
    kept, the run names the failed cell, and --resume runs only it."""
    from dpolab.experiment.runner import run_experiment

    raw = tiny_spec(tiny_model_dir)
    raw["methods"]["boom"] = {"loss": "dpo", "train": {"lr": 1e30}}
    raw["contexts"]["length-biased-judge"]["methods"] = ["dpo", "boom"]
    spec = load_spec(write_spec(tmp_path, {**raw, "threads": 1}))
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"1 cell\(s\) failed on ray: length-biased-judge__boom__s0 \(TrainingError: "
                                       r"non-finite"):
        run_experiment(spec, out, progress=False, executor="ray")
    assert set(_cells(out)) == {"resist-only__dpo__s0", "length-biased-judge__dpo__s0"}
    assert not (out / "cells" / "length-biased-judge__boom__s0" / "cell.json").exists()
    assert "length-biased-judge__boom__s0: failed: TrainingError" in capsys.readouterr().out
    with pytest.raises(RunError, match="length-biased-judge__boom__s0"):
        run_experiment(spec, out, resume=True, progress=False, executor="ray")
    assert set(_cells(out)) == {"resist-only__dpo__s0", "length-biased-judge__dpo__s0"}
