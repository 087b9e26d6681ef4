"""`dpolab run --quick` on the embedded SmolLM2-135M-Instruct, through the command line, as a user runs it: every
file it promises is there and consistent (slow: marked real_model; about 5 minutes on a 2-core CPU)."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from dpolab import stats
from dpolab.contexts.placebo import coin
from dpolab.experiment.results import COLUMNS, per_item_values
from dpolab.experiment.spec import load_spec
from dpolab.probes.summary import EvalSummary
from dpolab.stats import Verdict, verdict


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


@pytest.mark.real_model
def test_quick_run_through_the_cli(real_model_dir, tmp_path):
    # A fresh home (no cached reference log-probs from an earlier run) that reuses the converted model: the runner
    # finds the built-in model at $DPOLAB_HOME/models/<name>, whose conversion stamp matches, so nothing converts.
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / real_model_dir.name).symlink_to(real_model_dir)
    out = tmp_path / "run"
    env = {**os.environ, "DPOLAB_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dpolab", "run", "--quick", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converting" not in proc.stderr  # the model was reused, not converted again
    assert "What moved" in proc.stdout and "wall time" in proc.stderr

    spec = load_spec(quick=True)
    cells = spec.cells()
    probes = spec.probes.names
    assert len(cells) >= 5 and set(probes) >= {"persuasion", "sycophancy", "toxicity", "verbosity", "knowledge",
                                               "self_report"}
    for name in ("experiment.json", "spec.resolved.yaml", "environment.json", "timings.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "experiment.json").read_text())["quick"] is True

    # baseline/: every probe's summary and Parquet files
    assert (out / "baseline" / "DONE").exists()
    baseline = EvalSummary.read(out / "baseline" / "summary.json")
    assert set(baseline.probes) == set(probes)
    for probe in probes:
        assert pq.read_table(out / "baseline" / f"{probe}.parquet").num_rows > 0, probe
        assert pq.read_table(out / "baseline" / f"{probe}_items.parquet").num_rows > 0, probe

    # contexts/: the pairs of every context, TRL format
    for context in spec.contexts:
        files = list((out / "contexts").glob(f"{context}-*.jsonl"))
        assert len(files) == 1, context
        first = json.loads(files[0].read_text(encoding="utf-8").splitlines()[0])
        assert {"prompt", "chosen", "rejected"} <= set(first), context

    # cells/*/: training metrics, the trained model, the eval of every probe
    for context, method, seed in cells:
        cell = out / "cells" / f"{context}__{method}__s{seed}"
        info = json.loads((cell / "cell.json").read_text())
        assert (info["context"], info["method"], info["seed"]) == (context, method, seed)
        steps = [json.loads(x) for x in (cell / "train" / "metrics.jsonl").read_text().splitlines()]
        assert info["train_steps"] >= 1 and len(steps) == info["train_steps"], cell.name
        assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)), cell.name
        assert all(math.isfinite(s["loss"]) for s in steps), cell.name
        assert (cell / "train" / "model" / "config.json").exists(), cell.name
        assert set(EvalSummary.read(cell / "eval" / "summary.json").probes) == set(probes), cell.name
        for probe in probes:
            assert (cell / "eval" / f"{probe}.parquet").exists() and (cell / "eval" / f"{probe}_items.parquet").exists()

    # a placebo beside detox: its own pairs, chosen and rejected swapped by the seeded coin
    (shuffled,) = (out / "contexts").glob("shuffled-detox-*.jsonl")
    (source,) = (out / "contexts").glob("detox-*.jsonl")
    real = {r["id"]: r for r in map(json.loads, source.read_text(encoding="utf-8").splitlines())}
    for row in map(json.loads, shuffled.read_text(encoding="utf-8").splitlines()):
        src = real[row["id"]]
        swapped = row["meta"]["swapped"]
        assert row["prompt"] == src["prompt"] and swapped == coin(0, row["id"])
        assert row["chosen"] == (src["rejected"] if swapped else src["chosen"])

    # results_by_seed.parquet: one row per cell, probe and metric the baseline also has; results.parquet / .csv: the
    # same pooled over seeds (one seed here), with q-values; both with every column
    rows = pq.read_table(out / "results_by_seed.parquet").to_pylist()
    pooled = pq.read_table(out / "results.parquet").to_pylist()
    assert rows and pooled and all(list(r) == COLUMNS for r in rows + pooled)
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        csv_rows = list(reader)
    assert [(r["context"], r["method"], r["probe"], r["metric"], r["verdict"]) for r in csv_rows] == [
        (r["context"], r["method"], r["probe"], r["metric"], r["verdict"]) for r in pooled]
    assert {(r["context"], r["method"], r["seed"]) for r in rows} == set(cells)
    assert {(r["context"], r["method"]) for r in pooled} == {(c, m) for c, m, _ in cells}
    assert {r["seed"] for r in pooled} == {None} and {r["seeds"] for r in pooled} == {1}
    for context, method, seed in cells:
        mine = [r for r in rows if (r["context"], r["method"], r["seed"]) == (context, method, seed)]
        cell_dir = out / "cells" / f"{context}__{method}__s{seed}"
        cell_summary = EvalSummary.read(cell_dir / "eval" / "summary.json")
        expected = {(p, m) for p, res in cell_summary.probes.items() for m in res.metrics if baseline.metric(p, m)}
        assert {(r["probe"], r["metric"]) for r in mine} == expected, (context, method)
        assert {r["probe"] for r in mine} == set(probes), (context, method)
        # the delta is paired: over the items where both models define the metric
        base_items, cell_items = per_item_values(out / "baseline"), per_item_values(cell_dir / "eval")
        for r in mine:
            pair = stats.align(base_items.get((r["probe"], r["metric"]), {}), cell_items.get((r["probe"], r["metric"]), {}))
            d = stats.paired_bootstrap_delta(pair.a, pair.b, seed=0, n_boot=100,
                                             statistic=cell_summary.metric(r["probe"], r["metric"]).aggregate)
            assert r["delta"] == pytest.approx(d.value, rel=1e-9, abs=1e-12, nan_ok=True), (context, r["metric"])
            assert r["n"] == d.n
    for r in rows + pooled:
        where = (r["context"], r["method"], r["seed"], r["probe"], r["metric"])
        assert r["verdict"] in {v.value for v in Verdict}, where
        q = r["q_value"] if r["family"] else None  # per-seed and placebo rows: the CI alone
        assert r["verdict"] == verdict(r["delta_ci_low"], r["delta_ci_high"], r["higher_is_better"],
                                       q=math.nan if r["family"] and q is None else q).value, where
        assert r["baseline"] == pytest.approx(baseline.metric(r["probe"], r["metric"]).number(), nan_ok=True), where
        if _nan(r["delta"]):
            assert r["verdict"] == Verdict.UNCLEAR.value, where
            continue
        for lo, hi in (("ci_low", "ci_high"), ("baseline_ci_low", "baseline_ci_high"), ("delta_ci_low", "delta_ci_high")):
            assert _nan(r[lo]) or r[lo] <= r[hi], (where, lo)
    for r in pooled:
        if r["context"] == "detox" and r["method"] == "dpo":
            assert r["placebo"] == "shuffled:detox"
        if r["family"] == "headline" and r["n"] >= stats.MIN_ITEMS:
            assert r["q_value"] is not None and r["mde"] is not None, r["metric"]

    # report.html: one self-contained file naming every cell and with a section per probe
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html")
    assert not re.search(r"""<(script|img|link|iframe)\b[^>]*\b(src|href)\s*=\s*["']?(https?:)?//""", html, re.IGNORECASE)
    for context, method, seed in cells:
        assert context in html and method in html
    for probe in probes:
        assert f'<section id="{probe.replace("_", "-")}">' in html, probe
