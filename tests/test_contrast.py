"""`dpolab contrast RUN A B`: two methods of a run against each other, paired over items and matched by seed."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from dpolab import stats
from dpolab.cli import app
from dpolab.errors import ConfigError
from dpolab.experiment.contrast import CONTRAST_COLUMNS, contrast
from dpolab.experiment.results import ResultRow, write_results
from dpolab.stats import Verdict

ITEMS = [f"tx-{i:03d}" for i in range(40)]


def write_eval(folder, scores: dict[str, float], ppl: dict[str, float]) -> None:
    """An eval folder as the probes write it: summary.json and per-item values of two probes."""
    folder.mkdir(parents=True)
    metrics = {"toxicity": {"mean_score": (scores, False)}, "knowledge": {"perplexity": (ppl, False)}}
    probes = {}
    for probe, ms in metrics.items():
        rows, summary = [], {}
        for metric, (values, hib) in ms.items():
            rows += [{"item_id": i, "metric": metric, "value": v} for i, v in values.items()]
            mean = float(np.mean(list(values.values())))
            summary[metric] = {"value": mean, "ci_low": mean, "ci_high": mean, "n": len(values),
                               "higher_is_better": hib, "aggregate": "mean"}
        probes[probe] = {"metrics": summary, "info": {}}
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{probe}_items.parquet")
    (folder / "summary.json").write_text(json.dumps({"model": "m", "probes": probes}))


def make_run(tmp_path, cells: dict[tuple[str, str, int], tuple[dict, dict]]):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "experiment.json").write_text("{}")
    (run / "spec.resolved.yaml").write_text(yaml.safe_dump({"n_boot": 500}))
    for (context, method, seed), (scores, ppl) in cells.items():
        cell = run / "cells" / f"{context}__{method}__s{seed}"
        write_eval(cell / "eval", scores, ppl)
        (cell / "cell.json").write_text(json.dumps({"context": context, "method": method, "seed": seed}))
    rows = [ResultRow(context=c, method=m, seed=None, probe=p, metric=k, value=0.1, ci_low=0.0, ci_high=0.2, n=40,
                      baseline=0.1, baseline_ci_low=0.0, baseline_ci_high=0.2, delta=0.0, delta_ci_low=-0.1,
                      delta_ci_high=0.1, higher_is_better=False, verdict=Verdict.UNCLEAR)
            for c, m, _ in cells for p, k in (("toxicity", "mean_score"), ("knowledge", "perplexity"))]
    write_results(rows, run / "results.parquet")
    return run


def scores(rng, shift: float = 0.0) -> dict[str, float]:
    return {i: float(x) for i, x in zip(ITEMS, rng.uniform(0, 0.3, len(ITEMS)) + shift)}


def test_one_seed_contrast_is_the_paired_bootstrap_of_the_two_cells(tmp_path):
    rng = np.random.default_rng(0)
    tox_b, ppl = scores(rng), scores(rng, 10.0)
    tox_a = {i: v - 0.1 for i, v in tox_b.items()}  # A lowers every item's toxicity by 0.1: a clear improvement
    run = make_run(tmp_path, {("detox", "curry", 0): (tox_a, ppl), ("detox", "single", 0): (tox_b, ppl)})
    found = {r.metric: r for r in contrast(run, "detox/curry", "detox/single")}
    tox = found["mean_score"]
    assert tox.delta == pytest.approx(-0.1, abs=1e-12) and tox.ci_low == pytest.approx(-0.1, abs=1e-12)
    assert tox.value_a == pytest.approx(np.mean(list(tox_a.values()))) and tox.n == len(ITEMS) and tox.seeds == 1
    assert tox.verdict == Verdict.IMPROVED and tox.family == "headline"  # a matrix behaviour
    same = found["perplexity"]  # equal on every item: no change, no verdict
    assert same.delta == 0 and same.ci_low == 0 == same.ci_high and same.verdict == Verdict.UNCLEAR
    # a noisier difference: the same numbers as the stats module's paired bootstrap with the same draw
    tox_c = scores(rng)
    run2 = make_run(tmp_path / "2", {("detox", "a", 0): (tox_c, ppl), ("detox", "b", 0): (tox_b, ppl)})
    row = next(r for r in contrast(run2, "detox/a", "detox/b") if r.metric == "mean_score")
    from dpolab.banks import stable_hash

    want = stats.seed_pooled_delta([[tox_b[i] for i in ITEMS]], [[tox_c[i] for i in ITEMS]],
                                   seed=stable_hash("contrast", "detox/a", "detox/b", "toxicity", "mean_score"),
                                   n_boot=500).interval
    assert (row.delta, row.ci_low, row.ci_high) == (want.value, want.ci_low, want.ci_high)
    assert row.delta == pytest.approx(np.mean([tox_c[i] - tox_b[i] for i in ITEMS]), abs=1e-12)


def test_seeds_are_matched_and_unshared_seeds_left_out(tmp_path):
    rng = np.random.default_rng(1)
    ppl = scores(rng, 10.0)
    b = {s: scores(rng) for s in (0, 1, 2)}
    a = {s: {i: v + 0.05 * (s + 1) for i, v in b[s].items()} for s in (0, 1)}  # A ran seeds 0 and 1 only
    cells = {("detox", "a", s): (a[s], ppl) for s in a} | {("detox", "b", s): (b[s], ppl) for s in b}
    row = next(r for r in contrast(make_run(tmp_path, cells), "detox/a", "detox/b") if r.metric == "mean_score")
    assert row.seeds == 2 and row.delta == pytest.approx((0.05 + 0.10) / 2, abs=1e-12)  # seed 2 of B is not used
    # the seeds disagree by 0.05 on every item: the interval carries that spread (two seeds, few degrees of freedom)
    assert row.ci_low < 0.05 and row.ci_high > 0.10


def test_errors_name_what_is_wrong(tmp_path):
    rng = np.random.default_rng(2)
    ppl = scores(rng, 10.0)
    run = make_run(tmp_path, {("detox", "a", 0): (scores(rng), ppl), ("detox", "b", 1): (scores(rng), ppl)})
    with pytest.raises(ConfigError, match="no training seed in common"):
        contrast(run, "detox/a", "detox/b")
    with pytest.raises(ConfigError, match=r"no finished cell of 'detox/c'; the run has detox/a, detox/b"):
        contrast(run, "detox/a", "detox/c")
    with pytest.raises(ConfigError, match="CONTEXT/METHOD"):
        contrast(run, "a", "detox/b")
    with pytest.raises(ConfigError, match="two different methods"):
        contrast(run, "detox/a", "detox/a")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dpolab", "contrast", str(run), "detox/a", "detox/x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {run}: no finished cell of 'detox/x'")


def test_cli_prints_every_name_whole_and_csv_carries_the_rows(tmp_path):
    rng = np.random.default_rng(3)
    ppl = scores(rng, 10.0)
    run = make_run(tmp_path, {("length-biased-judge", "curry-single", 0): (scores(rng), ppl),
                              ("length-biased-judge", "curry", 0): (scores(rng), ppl)})
    runner = CliRunner()
    text = runner.invoke(app, ["contrast", str(run), "length-biased-judge/curry", "length-biased-judge/curry-single",
                               "--all"], env={"COLUMNS": "80"}).output
    assert "length-biased-judge/curry-single" in text and "toxicity · mean_score" in text and "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    out = runner.invoke(app, ["contrast", str(run), "length-biased-judge/curry", "length-biased-judge/curry-single",
                              "--all", "--format", "csv"]).output
    records = list(csv.DictReader(io.StringIO(out)))
    assert list(records[0]) == CONTRAST_COLUMNS and {r["metric"] for r in records} == {"mean_score", "perplexity"}
    assert all(not math.isnan(float(r["delta"])) for r in records)


def test_a_run_still_going_contrasts_its_finished_cells(tmp_path):
    rng = np.random.default_rng(4)
    ppl = scores(rng, 10.0)
    run = make_run(tmp_path, {("detox", "a", 0): (scores(rng), ppl), ("detox", "b", 0): (scores(rng), ppl)})
    finished = {r.metric: r for r in contrast(run, "detox/a", "detox/b")}
    (run / "results.parquet").unlink()  # as it is before the last cell ends
    going = {r.metric: r for r in contrast(run, "detox/a", "detox/b")}
    assert going == finished  # the same numbers, the same families
    (run / "experiment.json").unlink()
    with pytest.raises(ConfigError, match="is not a `dpolab run` folder"):
        contrast(run, "detox/a", "detox/b")
