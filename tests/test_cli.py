"""The command line: train on the tiny model, config errors, help text read from the registries."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dpolab.cli import app
from tests.test_train import persuasion_rows

runner = CliRunner()


def _data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in persuasion_rows()))
    return path


def test_train_command_runs_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))
    args = ["train", "--model", str(tiny_model_dir), "--data", str(_data(tmp_path)), "--out", str(tmp_path / "o"),
            "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--set", "progress=false"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "done: 2 steps" in result.output
    out = tmp_path / "o"
    from dpolab.training.checkpoint import list_checkpoints

    (last,) = [c for c in list_checkpoints(out) if c.step == 2]
    before = (last.path / "trainable.safetensors").read_bytes()
    # resuming a finished run starts at its last step, runs none, and changes neither its log nor its checkpoint
    resumed = runner.invoke(app, ["train", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    said = " ".join(resumed.output.split())  # rich wraps long lines at the console width
    assert f"resuming {out} from step 2 of 2" in said
    assert "done: 2 steps" in said and "final loss" not in said  # no step ran
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert [c.step for c in list_checkpoints(out)][-1] == 2
    assert (last.path / "trainable.safetensors").read_bytes() == before


def test_train_help_lists_every_loss():
    from dpolab.losses import LOSSES

    result = runner.invoke(app, ["train", "--help"], terminal_width=400)
    assert all(name in result.output for name in LOSSES.names())


def test_eval_help_splits_the_probes_by_their_default_flag_and_run_help_lists_the_presets():
    import re

    import yaml

    from dpolab.experiment.spec import DEFAULT_SPEC
    from dpolab.probes import PROBES

    text = " ".join(runner.invoke(app, ["eval", "--help"], terminal_width=400).output.split())
    by_default, on_request = re.search(r"by default (.*?); on request \(--probes\) (.*?)\.", text).groups()
    assert by_default.split(", ") == [n for n in PROBES.names() if PROBES.get(n).default]
    assert on_request.split(", ") == [n for n in PROBES.names() if not PROBES.get(n).default]
    run_help = " ".join(runner.invoke(app, ["run", "--help"], terminal_width=400).output.split())
    assert all(name in run_help for name in yaml.safe_load(DEFAULT_SPEC.read_text())["presets"])


def test_unknown_config_key_lists_valid_keys(tmp_path):
    from dpolab.config import TrainConfig, load_config
    from dpolab.errors import ConfigError

    cfg = tmp_path / "train.yaml"
    cfg.write_text("lrr: 0.1\nloss: dpo\n")
    with pytest.raises(ConfigError) as caught:
        load_config(TrainConfig, cfg)
    msg = str(caught.value)
    assert "unknown key 'lrr'" in msg and "batch_size" in msg and str(cfg) in msg


def test_bad_loss_and_bad_type_fail_clearly(tmp_path):
    from dpolab.config import TrainConfig, load_config
    from dpolab.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'ipo'"):
        load_config(TrainConfig, None, {"loss": "ipoo"})
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(TrainConfig, None, {"batch_size": "eight"})
    with pytest.raises(ConfigError, match="valid: alpha, offset, clamp, min_gap"):
        load_config(TrainConfig, None, {"loss": "odpo", "loss_args": {"alpah": 1}})


def test_cli_user_error_has_no_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "a"}\n')
    proc = subprocess.run([sys.executable, "-m", "dpolab", "train", "--model", "/nonexistent/model", "--data", str(bad),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_readme_documents_every_loss():
    from pathlib import Path

    from dpolab.losses import LOSSES

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert all(f"| `{name}` |" in readme for name in LOSSES.names())


def test_shipped_train_configs_validate():
    from pathlib import Path

    from dpolab.config import TrainConfig, load_config

    for path in (Path(__file__).parent.parent / "configs").glob("train*.yaml"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize("args, expected", [([], True), (["--quick"], False), (["--quick", "--estimate"], True),
                                            (["--no-estimate"], False)])
def test_run_estimates_by_default_but_not_a_quick_run(monkeypatch, tmp_path, args, expected):
    from dpolab.experiment import runner

    seen = {}

    def fake_run(spec, out, **kw):  # only what the command passes on
        seen.update(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_experiment", fake_run)
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 130 and seen["estimate"] is expected
    # the line that says how to continue repeats the choice only where it is not the default
    default = "--quick" not in args
    assert ("--estimate" in result.output) == (expected and not default)
    assert ("--no-estimate" in result.output) == (not expected and default)
