"""Experiment: verdicts on synthetic deltas, paired comparison rows, spec validation, results table."""
from __future__ import annotations

import math

import pytest

from dpolab.experiment.results import COLUMNS, ResultRow, compare
from dpolab.stats import Verdict, verdict


def result_row(**fields) -> ResultRow:
    """A results row with the given fields; the others empty and the verdict unclear unless given."""
    return ResultRow(**({c: None for c in COLUMNS} | {"verdict": Verdict.UNCLEAR} | fields))


@pytest.mark.parametrize("lo, hi, hib, expected", [
    (0.01, 0.2, True, "improved"),    # higher is better, CI above 0
    (0.01, 0.2, False, "harmed"),     # e.g. toxicity went up
    (-0.3, -0.05, True, "harmed"),
    (-0.3, -0.05, False, "improved"),
    (-0.1, 0.2, True, "no clear change"),
    (-0.1, 0.2, False, "no clear change"),
    (0.0, 0.2, True, "no clear change"),  # touching zero is not clear
    (math.nan, math.nan, True, "no clear change"),
])
def test_verdict(lo, hi, hib, expected):
    assert verdict(lo, hi, hib) == expected


def _summary(metrics):
    from dpolab.probes.summary import EvalSummary

    return EvalSummary.model_validate(
        {"model": "m", "probes": {"toxicity": {"metrics": {name: {"value": v, "ci_low": v - 0.01, "ci_high": v + 0.01,
                                                                  "n": 40, "higher_is_better": False, "aggregate": "mean"}
                                                           for name, v in metrics.items()}}}})


def test_compare_pairs_items_and_finds_a_clear_drop():
    ids = [f"p{i}" for i in range(40)]
    base_items = {("toxicity", "mean_score"): {i: 0.30 + 0.01 * (k % 5) for k, i in enumerate(ids)},
                  ("toxicity", "echo_rate"): {i: float(k % 2) for k, i in enumerate(ids)}}
    # every prompt drops by 0.1 (a paired design sees this clearly even though the spread is similar)
    cell_items = {("toxicity", "mean_score"): {i: v - 0.1 for i, v in base_items[("toxicity", "mean_score")].items()},
                  ("toxicity", "echo_rate"): {i: float((k + 1) % 2) for k, i in enumerate(ids)}}
    base = _summary({"mean_score": 0.32, "echo_rate": 0.5})
    cell = _summary({"mean_score": 0.22, "echo_rate": 0.5})
    rows = {r.metric: r for r in compare(base, cell, base_items, cell_items, context="detox", method="dpo", seed=0,
                                         n_boot=500)}
    tox = rows["mean_score"]
    assert tox.cell == ("detox", "dpo", 0)
    assert tox.delta == pytest.approx(-0.1)
    assert tox.delta_ci_low == pytest.approx(-0.1) and tox.delta_ci_high == pytest.approx(-0.1)
    assert tox.verdict == "improved" and tox.baseline == 0.32
    # echo flips on every item but its mean is unchanged: the CI straddles zero
    assert rows["echo_rate"].verdict == "no clear change"
    assert rows["echo_rate"].delta_ci_low < 0 < rows["echo_rate"].delta_ci_high


def test_results_parquet_round_trip(tmp_path):
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpolab.experiment.results import COLUMNS, read_results, read_rows_json, write_results
    from dpolab.io import atomic_write_json

    row = result_row(context="detox", method="dpo", seed=0, probe="toxicity", metric="mean_score", value=0.1,
                     delta=-0.05, delta_ci_low=float("nan"), higher_is_better=False, verdict="improved", n=3)
    assert row.verdict is Verdict.IMPROVED
    write_results([row], tmp_path / "results.parquet")
    (back,) = read_results(tmp_path / "results.parquet")
    assert back.verdict is Verdict.IMPROVED and back.seed == 0 and back.ci_low is None and math.isnan(back.delta_ci_low)
    assert back.model_dump(exclude={"delta_ci_low"}) == row.model_dump(exclude={"delta_ci_low"})
    schema = pq.read_schema(tmp_path / "results.parquet")
    assert schema.names == COLUMNS
    assert [schema.field(c).type for c in ("context", "seed", "n", "higher_is_better", "verdict", "value")] == [
        pa.string(), pa.int64(), pa.int64(), pa.bool_(), pa.string(), pa.float64()]
    assert pq.read_table(tmp_path / "results.parquet").column("verdict").to_pylist() == ["improved"]
    assert (tmp_path / "results.csv").read_text().splitlines()[0].split(",") == COLUMNS
    atomic_write_json(tmp_path / "rows.json", [row.record()])  # a cell's rows, as the runner writes them
    (again,) = read_rows_json(tmp_path / "rows.json")
    assert math.isnan(again.delta_ci_low) and again.verdict is Verdict.IMPROVED


def test_a_bad_result_row_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="verdict"):
        result_row(context="detox", method="dpo", seed=0, probe="toxicity", metric="m", verdict="better")
    with pytest.raises(ValidationError, match="seed"):
        ResultRow.model_validate({c: None for c in COLUMNS} | {"context": "d", "method": "m", "probe": "p", "metric": "x",
                                                           "verdict": "improved"})
    full = result_row(context="d", method="m", seed=0, probe="p", metric="x").model_dump()
    with pytest.raises(ValidationError, match="delta_ci_high\n  Field required"):
        ResultRow.model_validate({k: v for k, v in full.items() if k != "delta_ci_high"})
    with pytest.raises(ValidationError, match="extra"):
        result_row(context="d", method="m", seed=0, probe="p", metric="x", colour="red")


def test_headlines_name_what_moved():
    from dpolab.experiment.summary import headlines

    rows = [result_row(**{"context": "detox", "method": "dpo", "seed": 0, "probe": "toxicity", "metric": "mean_score", "baseline": 0.15,
             "value": 0.05, "delta": -0.1, "delta_ci_low": -0.12, "delta_ci_high": -0.07, "verdict": "improved"}),
            result_row(**{"context": "detox", "method": "dpo", "seed": 0, "probe": "verbosity", "metric": "mean_tokens", "baseline": 40,
             "value": 48, "delta": 8, "delta_ci_low": 3, "delta_ci_high": 12, "verdict": "harmed"})]
    (s,) = headlines(rows)
    assert s.startswith("dpo on detox: improved toxicity 0.15 → 0.05") and "harmed reply length" in s


def test_seed_findings_follow_the_sign_of_the_ci():
    from dpolab.experiment.summary import seed_findings

    def row(context, probe, metric, lo, hi):
        return result_row(**{"context": context, "method": "dpo", "seed": 0, "probe": probe, "metric": metric, "baseline": 0.5,
                "value": 0.5 + (lo + hi) / 2, "delta": (lo + hi) / 2, "delta_ci_low": lo, "delta_ci_high": hi, "n": 10})

    rows = [row("detox", "toxicity", "mean_score", -0.1, -0.02),             # expected fall, fell
            row("length-biased-judge", "verbosity", "mean_tokens", -9, -2),  # expected rise, fell
            row("resist-only", "persuasion", "neg_acc@3", -0.1, 0.3),        # CI contains 0
            row("holistic", "persuasion", "pos_flip@3", -0.1, 0.1),          # expected to stay, stayed
            row("holistic", "persuasion", "pos_flip@1", -0.5, -0.1),         # not a seed finding's metric
            row("please-user", "toxicity", "mean_score", 0.1, 0.2)]          # nor this
    found = {(f["context"], f["metric"]): f["status"] for f in seed_findings(rows)}
    assert found == {("detox", "toxicity · mean_score"): "reproduced",
                     ("length-biased-judge", "verbosity · mean_tokens"): "opposite",
                     ("resist-only", "persuasion · neg_acc@3"): "not shown",
                     ("holistic", "persuasion · pos_flip@3"): "reproduced"}


def test_seed_findings_and_matrix_use_the_last_turn_run():
    from dpolab.experiment.summary import headlines, seed_findings

    rows = [result_row(**{"context": "please-user", "method": "dpo", "seed": 0, "probe": "persuasion", "metric": m, "baseline": 0.5,
             "value": 0.8, "delta": 0.3, "delta_ci_low": lo, "delta_ci_high": 0.5, "n": 8,
             "verdict": "harmed" if lo > 0 else "no clear change"})
            for m, lo in (("neg_flip@1", -0.1), ("neg_flip@2", 0.1), ("neg_flip@2|technique=evidence", 0.1))]
    (f,) = seed_findings(rows)
    assert f["metric"] == "persuasion · neg_flip@2" and f["status"] == "reproduced"
    assert "flips to a wrong answer 0.5 → 0.8" in headlines(rows)[0]


@pytest.mark.parametrize("width", [220, 80])
def test_matrix_prints_every_delta_wide_or_narrow(width):
    import io

    from rich.console import Console

    from dpolab.experiment.summary import print_matrix

    rows = [result_row(**{"context": "detox", "method": "dpo", "seed": 0, "probe": "toxicity", "metric": "mean_score", "baseline": 0.125,
             "value": 0.063, "delta": -0.062, "delta_ci_low": -0.14, "delta_ci_high": 0.003, "verdict": "no clear change"}),
            result_row(**{"context": "detox", "method": "dpo", "seed": 0, "probe": "verbosity", "metric": "mean_tokens", "baseline": 40,
             "value": 48, "delta": 8.25, "delta_ci_low": 3.5, "delta_ci_high": 12.75, "verdict": "harmed"})]
    from dpolab.experiment.summary import behaviours

    # every other headline behaviour measured too, unchanged: the matrix has all its columns
    rows += [result_row(**{"context": "detox", "method": "dpo", "seed": 0, "probe": b.probe, "metric": b.metric, "baseline": 0.5,
              "value": 0.5, "delta": 0.0, "delta_ci_low": -0.01, "delta_ci_high": 0.01, "verdict": "no clear change"})
             for b in behaviours() if b.probe not in ("toxicity", "verbosity")]
    out = io.StringIO()
    print_matrix(rows, Console(file=out, width=width, color_system=None))
    text = out.getvalue()
    for number in ("-0.062", "-0.140", "+0.003", "+8.250", "+3.500", "+12.750"):
        assert number in text
    assert ("verdict" in text) == (width == 80)  # the narrow layout has a verdict column
