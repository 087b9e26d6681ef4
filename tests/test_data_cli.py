"""`dpolab data validate`: lists every bad row and exits 1, or prints a one-line summary and exits 0."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from dpolab.cli import app
from dpolab.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
runner = CliRunner()


def test_bad_file_lists_every_problem_and_exits_1():
    path = FIXTURES / "bad.jsonl"
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    for expected in (f"{path}:2: field 'chosen': chosen is identical to rejected",
                     f"{path}:3: field 'chosen': missing",
                     f"{path}:5: invalid JSON",
                     f"{path}:6: field 'score_chosen': must be a finite number, got 'nan'",
                     f"{path}:7: field 'id': duplicate id 'ok' (first used at {path}:1)",
                     f"{path}:8: field 'prompt[0].role': unknown role 'robot'"):
        assert expected in result.output
    assert "6 of 7 rows invalid, 6 problem(s)" in result.output


def test_good_file_exits_0_with_a_summary():
    result = runner.invoke(app, ["data", "validate", str(FIXTURES / "good.jsonl")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{FIXTURES / 'good.jsonl'}: 3 rows, all valid"


def test_max_length_with_a_model_flags_prompts_that_do_not_fit(tiny_model_dir):
    path = FIXTURES / "multiturn.jsonl"
    result = runner.invoke(app, ["data", "validate", str(path), "--model", str(tiny_model_dir), "--max-length", "32"])
    assert result.exit_code == 1
    for line in (1, 2, 3):  # 27 uncuttable tokens (last turn + assistant header) + 6 for "Blue.<|im_end|>"
        assert f"{path}:{line}: field 'prompt': prompt too long to leave room for the completion (prompt " in result.output
    cut = runner.invoke(app, ["data", "validate", str(path), "--model", str(tiny_model_dir), "--max-length", "33"])
    assert cut.exit_code == 0, cut.output


def test_max_length_needs_a_model():
    result = runner.invoke(app, ["data", "validate", str(FIXTURES / "good.jsonl"), "--max-length", "10"])
    assert result.exit_code == 2
    assert "needs --model" in result.output


def test_unsupported_file_is_a_data_error(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hi")
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert isinstance(result.exception, DataError)  # main() prints it as one line and exits 2
