"""Experiment: verdicts on synthetic deltas, paired comparison rows, spec validation, results table."""
from __future__ import annotations

import math

import pytest

from dpolab.experiment.results import COLUMNS, ResultRow, compare
from dpolab.stats import Verdict, verdict


def result_row(**fields) -> ResultRow:
    """A results row with the given fields; the others empty and the verdict unclear unless given."""
    required = {c: None for c, f in ResultRow.model_fields.items() if f.is_required()}
    return ResultRow(**(required | {"verdict": Verdict.UNCLEAR} | fields))


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
            result_row(**{"context": "detox", "method": "dpo", "seed": 0, "probe": "verbosity", "metric": "median_tokens", "baseline": 40,
             "value": 48, "delta": 8, "delta_ci_low": 3, "delta_ci_high": 12, "verdict": "harmed"})]
    (s,) = headlines(rows)
    # the report's number format (dpolab.numbers): three significant digits, a true minus sign
    assert s.startswith("dpo on detox: improved toxicity 0.150 → 0.0500 (Δ −0.100 [−0.120, −0.0700])")
    assert s.endswith("40.0 → 48.0 (Δ +8.00 [+3.00, +12.0]).") and "harmed reply length" in s


def test_seed_findings_follow_the_ci_the_q_value_and_the_mde():
    from dpolab.experiment.summary import seed_findings

    def row(context, probe, metric, lo, hi, method="dpo", **more):
        return result_row(**{"context": context, "method": method, "seed": None, "probe": probe, "metric": metric,
                "baseline": 0.5, "value": 0.5 + (lo + hi) / 2, "delta": (lo + hi) / 2, "delta_ci_low": lo,
                "delta_ci_high": hi, "n": 10, **more})

    rows = [row("detox", "toxicity", "mean_score", -0.1, -0.02, q_value=0.01),                   # expected fall, fell
            row("detox", "toxicity", "mean_score", -0.1, -0.02, method="odpo", q_value=0.2),     # ... not across the run
            row("length-biased-judge", "verbosity", "median_tokens", -9, -2),                      # expected rise, fell
            row("resist-only", "persuasion", "neg_acc@3", -0.1, 0.3, mde=0.2),                   # CI contains 0, wider than MDE
            row("resist-only", "persuasion", "pos_flip@3", -0.05, 0.04, mde=0.1),               # expected fall, unmoved
            row("holistic", "persuasion", "pos_flip@3", -0.1, 0.1, mde=0.2),                     # expected to stay: inside ±MDE
            row("holistic", "persuasion", "pos_flip@3", -0.1, 0.1, method="ipo", mde=0.05),      # contains 0, not inside ±MDE
            row("holistic", "persuasion", "pos_flip@3", 0.05, 0.1, method="cdpo", mde=0.2),      # moved: refuted
            row("holistic", "persuasion", "pos_flip@1", -0.5, -0.1),                             # not a seed finding's metric
            row("please-user", "toxicity", "mean_score", 0.1, 0.2)]                              # nor this
    found = {(f["context"], f["method"], f["metric"]): f["status"] for f in seed_findings(rows)}
    assert found == {("detox", "dpo", "toxicity · mean_score"): "reproduced",
                     ("detox", "odpo", "toxicity · mean_score"): "not shown",
                     ("length-biased-judge", "dpo", "verbosity · median_tokens"): "refuted",
                     ("resist-only", "dpo", "persuasion · neg_acc@3"): "not shown",
                     ("resist-only", "dpo", "persuasion · pos_flip@3"): "not shown",
                     ("holistic", "dpo", "persuasion · pos_flip@3"): "reproduced",
                     ("holistic", "ipo", "persuasion · pos_flip@3"): "not shown",
                     ("holistic", "cdpo", "persuasion · pos_flip@3"): "refuted"}


def test_seed_findings_and_matrix_use_the_last_turn_run():
    from dpolab.experiment.summary import headlines, seed_findings

    rows = [result_row(**{"context": "please-user", "method": "dpo", "seed": 0, "probe": "persuasion", "metric": m, "baseline": 0.5,
             "value": 0.8, "delta": 0.3, "delta_ci_low": lo, "delta_ci_high": 0.5, "n": 8,
             "verdict": "harmed" if lo > 0 else "no clear change"})
            for m, lo in (("neg_flip@1", -0.1), ("neg_flip@2", 0.1), ("neg_flip@2|technique=evidence", 0.1))]
    (f,) = seed_findings(rows)
    assert f["metric"] == "persuasion · neg_flip@2" and f["status"] == "reproduced"
    assert "flips to a wrong answer 0.500 → 0.800" in headlines(rows)[0]


@pytest.mark.parametrize("width, terminal, table", [(1000, True, True), (220, True, False), (80, True, False),
                                                    (1000, False, False)])
def test_matrix_prints_every_delta_wide_or_narrow(width, terminal, table):
    import io

    from rich.console import Console

    from dpolab.experiment.summary import print_matrix

    rows = [result_row(**{"context": "detox", "method": "dpo", "seed": 0, "probe": "toxicity", "metric": "mean_score", "baseline": 0.125,
             "value": 0.063, "delta": -0.062, "delta_ci_low": -0.14, "delta_ci_high": 0.003, "verdict": "no clear change"}),
            result_row(**{"context": "detox", "method": "dpo", "seed": 0, "probe": "verbosity", "metric": "median_tokens", "baseline": 40,
             "value": 48, "delta": 8.25, "delta_ci_low": 3.5, "delta_ci_high": 12.75, "verdict": "harmed"})]
    from dpolab.experiment.summary import behaviours

    # every other headline behaviour measured too, unchanged: the matrix has all its columns
    rows += [result_row(**{"context": "detox", "method": "dpo", "seed": 0, "probe": b.probe, "metric": b.metric, "baseline": 0.5,
              "value": 0.5, "delta": 0.0, "delta_ci_low": -0.01, "delta_ci_high": 0.01, "verdict": "no clear change"})
             for b in behaviours() if b.probe not in ("toxicity", "verbosity")]
    out = io.StringIO()
    print_matrix(rows, Console(file=out, width=width, force_terminal=terminal, color_system=None))
    text = out.getvalue()
    for number in ("-0.062", "-0.140", "+0.003", "+8.250", "+3.500", "+12.750"):
        assert number in text
    # the matrix is a table only on a terminal that holds it whole; otherwise one block per cell, with verdicts
    assert ("┃" in text) == table and ("no clear change" in text) == (not table)


def _toxicity_eval(values: dict[str, float], extra: dict[str, float] | None = None):
    """A CellEval whose toxicity probe has mean_score (headline) and a detail metric, from per-item values."""
    from dpolab.experiment.pool import CellEval

    items = {("toxicity", "mean_score"): values, ("toxicity", "mean_score|seed=0"): extra or values}
    mean = sum(values.values()) / len(values)
    return CellEval(_summary({"mean_score": mean, "mean_score|seed=0": mean}), items)


def test_pool_over_seeds_against_baseline_and_placebo():
    import numpy as np

    from dpolab import stats
    from dpolab.experiment.pool import pool

    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(40)]
    base = {i: 0.3 + 0.1 * rng.random() for i in ids}
    cells = {}
    for s in range(3):
        shift = rng.normal(scale=0.01)  # each seed moves a little differently
        cells[("detox", "dpo", s)] = _toxicity_eval({i: v - 0.10 + shift + rng.normal(scale=0.01) for i, v in base.items()})
        cells[("shuffled:detox", "dpo", s)] = _toxicity_eval({i: v - 0.06 + rng.normal(scale=0.01) for i, v in base.items()})
    baseline = _toxicity_eval(base)
    rows = pool(baseline.summary, baseline.items, cells, headline_metrics={("toxicity", "mean_score")}, n_boot=400)
    by = {(r.context, r.metric): r for r in rows}
    real, placebo = by[("detox", "mean_score")], by[("shuffled:detox", "mean_score")]
    assert real.seed is None and real.seeds == 3 and len(real.seed_deltas) == 3
    assert real.delta == pytest.approx(float(np.mean(real.seed_deltas)), rel=1e-12)
    assert real.delta == pytest.approx(-0.10, abs=0.02) and real.verdict == Verdict.IMPROVED
    assert real.family == "headline" and by[("detox", "mean_score|seed=0")].family == "detail"
    assert real.placebo == "shuffled:detox"
    assert real.delta_vs_placebo == pytest.approx(-0.04, abs=0.02)
    assert real.delta_vs_placebo_ci_high < 0 and real.verdict_vs_placebo == Verdict.IMPROVED
    # placebo cells are controls: pooled against the baseline, but in no q-value family
    assert placebo.family is None and placebo.q_value is None and placebo.placebo is None
    # q-values: Benjamini-Hochberg over each family's p-values
    headline = [r for r in rows if r.family == "headline"]
    assert [r.q_value for r in headline] == pytest.approx(stats.q_values([r.p_value for r in headline]))
    assert real.mde is not None and real.mde > 0


def test_placebo_for_prefers_the_same_method_shuffled():
    from dpolab.experiment.pool import placebo_for

    groups = {("detox", "dpo"), ("detox", "odpo"), ("shuffled:detox", "dpo"), ("self-sft:detox", "sft")}
    assert placebo_for("detox", "dpo", groups) == ("shuffled:detox", "dpo")
    assert placebo_for("detox", "odpo", groups) == ("self-sft:detox", "sft")
    assert placebo_for("shuffled:detox", "dpo", groups) is None
    assert placebo_for("holistic", "dpo", groups) is None


def test_matrix_against_the_placebo_prints_missing_values_as_nan():
    import io

    from rich.console import Console

    from dpolab.experiment.summary import print_matrix

    rows = [result_row(context="detox", method="dpo", seed=None, probe="toxicity", metric="mean_score", baseline=0.1,
                       value=0.05, delta=-0.05, delta_ci_low=-0.08, delta_ci_high=-0.02, placebo="shuffled:detox",
                       delta_vs_placebo=None, verdict="improved"),
            result_row(context="detox", method="dpo", seed=None, probe="verbosity", metric="median_tokens", baseline=90,
                       value=95, delta=5, delta_ci_low=-1, delta_ci_high=11, placebo="shuffled:detox",
                       delta_vs_placebo=2.5, delta_vs_placebo_ci_low=0.5, delta_vs_placebo_ci_high=4.5,
                       verdict_vs_placebo="harmed")]
    for width in (220, 80):
        out = io.StringIO()
        print_matrix(rows, Console(file=out, width=width, color_system=None), against="placebo")
        text = out.getvalue()
        assert "Δ vs placebo" in text and "+2.500" in text and "nan" in text
