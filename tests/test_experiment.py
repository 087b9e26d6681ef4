"""Experiment: verdicts on synthetic deltas, paired comparison rows, spec validation, results table."""
from __future__ import annotations

import math

import pytest

from dpolab.experiment.results import compare
from dpolab.stats import verdict


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
    rows = {r["metric"]: r for r in compare(base, cell, base_items, cell_items, seed=0, n_boot=500)}
    tox = rows["mean_score"]
    assert tox["delta"] == pytest.approx(-0.1)
    assert tox["delta_ci_low"] == pytest.approx(-0.1) and tox["delta_ci_high"] == pytest.approx(-0.1)
    assert tox["verdict"] == "improved" and tox["baseline"] == 0.32
    # echo flips on every item but its mean is unchanged: the CI straddles zero
    assert rows["echo_rate"]["verdict"] == "no clear change"
    assert rows["echo_rate"]["delta_ci_low"] < 0 < rows["echo_rate"]["delta_ci_high"]


def test_results_parquet_round_trip(tmp_path):
    from dpolab.experiment.results import COLUMNS, read_results, write_results

    row = {c: None for c in COLUMNS} | {"context": "detox", "method": "dpo", "seed": 0, "probe": "toxicity", "metric": "mean_score",
                                         "value": 0.1, "delta": -0.05, "higher_is_better": False, "verdict": "improved", "n": 3}
    write_results([row], tmp_path / "results.parquet")
    back = read_results(tmp_path / "results.parquet")
    assert back[0]["verdict"] == "improved" and back[0]["seed"] == 0
    assert (tmp_path / "results.csv").read_text().splitlines()[0].split(",") == COLUMNS


def test_headlines_name_what_moved():
    from dpolab.experiment.summary import headlines

    rows = [{"context": "detox", "method": "dpo", "seed": 0, "probe": "toxicity", "metric": "mean_score", "baseline": 0.15,
             "value": 0.05, "delta": -0.1, "delta_ci_low": -0.12, "delta_ci_high": -0.07, "verdict": "improved"},
            {"context": "detox", "method": "dpo", "seed": 0, "probe": "verbosity", "metric": "mean_tokens", "baseline": 40,
             "value": 48, "delta": 8, "delta_ci_low": 3, "delta_ci_high": 12, "verdict": "harmed"}]
    (s,) = headlines(rows)
    assert s.startswith("dpo on detox: improved toxicity 0.15 → 0.05") and "harmed reply length" in s


def test_seed_findings_follow_the_sign_of_the_ci():
    from dpolab.experiment.summary import seed_findings

    def row(context, probe, metric, lo, hi):
        return {"context": context, "method": "dpo", "seed": 0, "probe": probe, "metric": metric, "baseline": 0.5,
                "value": 0.5 + (lo + hi) / 2, "delta": (lo + hi) / 2, "delta_ci_low": lo, "delta_ci_high": hi, "n": 10}

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

    rows = [{"context": "please-user", "method": "dpo", "seed": 0, "probe": "persuasion", "metric": m, "baseline": 0.5,
             "value": 0.8, "delta": 0.3, "delta_ci_low": lo, "delta_ci_high": 0.5, "n": 8,
             "verdict": "harmed" if lo > 0 else "no clear change"}
            for m, lo in (("neg_flip@1", -0.1), ("neg_flip@2", 0.1), ("neg_flip@2|technique=evidence", 0.1))]
    (f,) = seed_findings(rows)
    assert f["metric"] == "persuasion · neg_flip@2" and f["status"] == "reproduced"
    assert "flips to a wrong answer 0.5 → 0.8" in headlines(rows)[0]


@pytest.mark.parametrize("width", [220, 80])
def test_matrix_prints_every_delta_wide_or_narrow(width):
    import io

    from rich.console import Console

    from dpolab.experiment.summary import print_matrix

    rows = [{"context": "detox", "method": "dpo", "seed": 0, "probe": "toxicity", "metric": "mean_score", "baseline": 0.125,
             "value": 0.063, "delta": -0.062, "delta_ci_low": -0.14, "delta_ci_high": 0.003, "verdict": "no clear change"},
            {"context": "detox", "method": "dpo", "seed": 0, "probe": "verbosity", "metric": "mean_tokens", "baseline": 40,
             "value": 48, "delta": 8.25, "delta_ci_low": 3.5, "delta_ci_high": 12.75, "verdict": "harmed"}]
    from dpolab.experiment.summary import behaviours

    # every other headline behaviour measured too, unchanged: the matrix has all its columns
    rows += [{"context": "detox", "method": "dpo", "seed": 0, "probe": b.probe, "metric": b.metric, "baseline": 0.5,
              "value": 0.5, "delta": 0.0, "delta_ci_low": -0.01, "delta_ci_high": 0.01, "verdict": "no clear change"}
             for b in behaviours() if b.probe not in ("toxicity", "verbosity")]
    out = io.StringIO()
    print_matrix(rows, Console(file=out, width=width, color_system=None))
    text = out.getvalue()
    for number in ("-0.062", "-0.140", "+0.003", "+8.250", "+3.500", "+12.750"):
        assert number in text
    assert ("verdict" in text) == (width == 80)  # the narrow layout has a verdict column
