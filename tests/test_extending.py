"""Adding a probe or a context is one file plus one registry line: the throwaway ones in tests/extension_examples.py
appear in `dpolab eval --help`, in a run's results.parquet, in the matrix and in report.html, and the spec validator
takes them. (Adding a loss: tests/test_train.py::test_a_loss_without_beta_is_never_handed_one.)"""
from __future__ import annotations

import importlib
import io

import pytest
import yaml
from typer.testing import CliRunner

from dpolab.contexts import CONTEXTS
from dpolab.probes import PROBES


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(PROBES._entries, "reply_words", "tests.extension_examples:WORDS_PROBE")  # the one line
    monkeypatch.setitem(CONTEXTS._entries, "prefer-short", "tests.extension_examples:SHORT_CONTEXT")  # the one line


def test_a_new_probe_and_context_show_up_everywhere(registered, tiny_model_dir, tmp_path, monkeypatch):
    from rich.console import Console

    import dpolab.cli
    from dpolab.experiment import runner
    from dpolab.experiment.results import read_results
    from dpolab.experiment.spec import load_spec
    from dpolab.experiment.summary import print_matrix

    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))
    cli = importlib.reload(dpolab.cli)  # help texts are built when the CLI module loads, as in a new process
    try:
        help_text = CliRunner().invoke(cli.app, ["eval", "--help"], terminal_width=400).output
        assert "reply_words" in help_text
        assert "prefer-short" in CliRunner().invoke(cli.app, ["run", "--help"], terminal_width=400).output
    finally:
        importlib.reload(dpolab.cli)
    spec = {"model": str(tiny_model_dir), "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 2, "save_every": 1000},
            "contexts": {"prefer-short": {"options": {"n_instructions": 4}}},
            "probes": {"names": ["reply_words", "verbosity"], "sizes": {"verbosity": {"n_instructions": 3, "max_new_tokens": 8}}},
            "n_boot": 200}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    runner.run_experiment(load_spec(path), out, progress=False)
    rows = read_results(out / "results.parquet")
    mine = [r for r in rows if r.probe == "reply_words"]
    assert [(r.context, r.metric) for r in mine] == [("prefer-short", "words")]
    assert mine[0].higher_is_better is False and mine[0].verdict in ("improved", "harmed", "no clear change")
    printed = io.StringIO()
    print_matrix(rows, Console(file=printed, width=400, color_system=None))
    assert "words per reply" in printed.getvalue() and "prefer-short" in printed.getvalue()
    html = (out / "report.html").read_text(encoding="utf-8")
    assert '<section id="reply_words">' in html and "words per greedy reply" in html and "words per reply" in html
    assert "prefer-short" in html
    # the quick variant applies each one's declared quick sizes
    quick = load_spec(path, quick=True)
    assert quick.probes.sizes["reply_words"]["n_instructions"] == 2
    assert quick.contexts["prefer-short"].options["n_instructions"] == 2


def test_the_spec_validator_knows_new_names_and_their_options(registered, tiny_model_dir, tmp_path):
    from dpolab.errors import ConfigError
    from dpolab.experiment.spec import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "contexts": {"prefer-short": {"options": {"n_instruction": 2}}}}))
    with pytest.raises(ConfigError, match="unknown option.*n_instruction.*choose from n_instructions"):
        load_spec(path)
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "contexts": {"prefer-short": {}},
                                    "probes": {"names": ["reply_word"]}}))
    with pytest.raises(ConfigError, match="did you mean 'reply_words'"):
        load_spec(path)
