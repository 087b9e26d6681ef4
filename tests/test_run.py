"""`dpolab run` end to end on the tiny model: spec validation, a quick grid, resume after a kill, compare."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from dpolab.contexts import CONTEXTS
from dpolab.errors import ConfigError
from dpolab.experiment.spec import load_spec

TINY_SIZES = {
    "persuasion": {"n_items": 3, "turns": 2, "techniques": ["evidence"], "max_new_tokens": 8},
    "sycophancy": {"n_items": 4},
    "toxicity": {"n_prompts": 4, "k": 1, "seeds": [0], "max_new_tokens": 8},
    "verbosity": {"n_instructions": 3, "max_new_tokens": 8},
    "knowledge": {"n_items": 6, "n_chunks": 2},
}


def tiny_spec(model_dir, contexts=None) -> dict:
    return {
        "model": str(model_dir),
        "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 2, "save_every": 1000},
        "methods": {"dpo": {"loss": "dpo"}, "odpo": {"loss": "odpo"}},
        "contexts": contexts or {
            "resist-only": {"options": {"n_items": 3, "turns": 1, "max_new_tokens": 8}},
            "length-biased-judge": {"methods": ["dpo", "odpo"], "options": {"n_instructions": 6, "max_new_tokens": 400}},
        },
        "probes": {"sizes": TINY_SIZES},
        "n_boot": 200,
    }


def write_spec(tmp_path, spec: dict):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("change, message", [
    ({"contexts": {"resist-onyl": {}}}, "did you mean 'resist-only'"),
    ({"methods": {"dpo": {"loss": "dpoo"}, "odpo": {"loss": "odpo"}}}, "unknown loss 'dpoo'"),
    ({"probes": {"names": ["toxicty"]}}, "unknown probe 'toxicty'"),
    ({"seeds": "zero"}, "seeds"),
    ({"train": {"lr": "fast"}}, "lr"),
    ({"contexts": {"detox": {"options": {"n_promts": 3}}}}, "n_promts"),
    ({"contexts": {"detox": {"methods": ["simpo"]}}}, "names method 'simpo'"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_spec_errors_are_clear(tmp_path, tiny_model_dir, change, message):
    spec = {**tiny_spec(tiny_model_dir), **change}
    with pytest.raises(ConfigError, match=message):
        load_spec(write_spec(tmp_path, spec))


def test_default_spec_loads_with_and_without_quick():
    default, quick = load_spec(), load_spec(quick=True)
    # the default: one context against its placebo, three seeds of every cell
    assert default.cells() == [(c, "dpo", s) for s in (0, 1, 2) for c in ("detox", "shuffled:detox")]
    # --quick: a smoke run of every context with each one's declared quick sizes, one seed, a placebo too
    assert {c for c, _, _ in quick.cells()} == {"please-user", "resist-only", "holistic", "detox", "length-biased-judge",
                                               "shuffled:detox"}
    assert {s for _, _, s in quick.cells()} == {0} and ("detox", "odpo", 0) in quick.cells()
    assert quick.probes.sizes["persuasion"]["n_items"] < default.probes.sizes["persuasion"]["n_items"]
    for name, entry in quick.contexts.items():
        assert entry.options == {**load_spec(preset="full").contexts[name].options, **CONTEXTS.get(name).quick}, name


def test_the_care_preset_drops_detox_and_names_the_care_probes():
    care = load_spec(preset="care")
    assert "detox" not in care.contexts  # `detox: null` in the preset removes the default's context
    assert set(care.contexts) == {"please-user", "satisfaction-therapist", "reflective-care", "risky-choices"}
    assert ("shuffled:risky-choices", "dpo", 0) in care.cells()
    assert {"reply_style", "mental_health", "risk", "self_report"} <= set(care.probes.names)


def test_fingerprint_is_what_the_run_computes(tmp_path):
    """Retuning another preset, the quick block or the budgets leaves a run's fingerprint (and so --resume) intact."""
    from dpolab.experiment.spec import DEFAULT_SPEC

    data = yaml.safe_load(DEFAULT_SPEC.read_text(encoding="utf-8"))
    retuned = {**data, "contexts": {"detox": {**data["contexts"]["detox"], "options": {"n_prompts": 8, "k": 2}}},
               "budgets": {"total_minutes": 1}, "quick": {"seeds": [5]}}
    path = write_spec(tmp_path, retuned)
    assert load_spec(path, preset="full").fingerprint() == load_spec(preset="full").fingerprint()
    assert load_spec(path).fingerprint() != load_spec().fingerprint()


def test_presets_and_placebo_cells():
    full = load_spec(preset="full")
    assert full.seeds == [0, 1, 2] and load_spec(preset="default") == load_spec()
    cells = full.cells()
    assert cells[: len(cells) // 3] == [(c, m, 0) for c, m, _ in cells[: len(cells) // 3]]  # seed by seed
    assert {("shuffled:detox", "odpo", 1), ("self-sft:detox", "sft", 2), ("shuffled:holistic", "dpo", 0)} <= set(cells)
    sft = full.train_config("self-sft:detox", "sft", data="-", out="-", seed=0)
    real = full.train_config("detox", "dpo", data="-", out="-", seed=0)
    assert sft.loss == "sft" and (sft.epochs, sft.batch_size, sft.lr) == (real.epochs, real.batch_size, real.lr)
    with pytest.raises(ConfigError, match="no preset 'huge'"):
        load_spec(preset="huge")
    with pytest.raises(ConfigError, match="choose one"):
        load_spec(quick=True, preset="full")


def test_unknown_placebo_is_refused(tmp_path, tiny_model_dir):
    spec = tiny_spec(tiny_model_dir, contexts={"detox": {"placebos": ["shufled"]}})
    with pytest.raises(ConfigError, match="unknown placebo 'shufled'"):
        load_spec(write_spec(tmp_path, spec))


def test_seeds_and_placebos_end_to_end(tmp_path, tiny_model_dir, home):
    """Two seeds of a context beside both placebos: per-seed rows, rows pooled over seeds with q-values and MDEs,
    each real row against its placebo, and the report's placebo matrix."""
    from dpolab.experiment import runner
    from dpolab.experiment.results import read_results

    # a user's pairs with one-word replies: self-sft samples as long as the longest chosen, so the random tiny model
    # rarely emits a special token in them
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"u{i}", "prompt": [{"role": "user", "content": f"Say a word {i}."}],
                                        "chosen": [{"role": "assistant", "content": "Yes."}],
                                        "rejected": [{"role": "assistant", "content": f"No {i}."}]}) + "\n"
                            for i in range(16)))
    contexts = {"user-data": {"options": {"path": str(data)}, "placebos": ["shuffled", "self-sft"]}}
    spec = tiny_spec(tiny_model_dir, contexts=contexts)
    spec["probes"]["sizes"] = {**TINY_SIZES, "knowledge": {"n_items": 12, "n_chunks": 2}}  # >= stats.MIN_ITEMS: a q-value
    spec = load_spec(write_spec(tmp_path, {**spec, "seeds": [0, 1]}))
    out = tmp_path / "run"
    runner.run_experiment(spec, out, progress=False)
    by_seed = read_results(out / "results_by_seed.parquet")
    assert {r.cell for r in by_seed} == {(c, m, s) for s in (0, 1) for c, m in (
        ("user-data", "dpo"), ("shuffled:user-data", "dpo"), ("self-sft:user-data", "sft"))}
    pooled = read_results(out / "results.parquet")
    assert {r.seed for r in pooled} == {None} and {r.seeds for r in pooled} == {2}
    real = [r for r in pooled if r.context == "user-data"]
    assert {r.placebo for r in real} == {"shuffled:user-data"}
    assert any(r.family == "headline" and r.q_value is not None for r in real)
    assert all(len(r.seed_deltas) == 2 for r in real)
    one = next(r for r in real if r.metric == "accuracy")
    seeds = {r.seed: r for r in by_seed if r.context == one.context and r.method == one.method and r.metric == one.metric}
    assert one.seed_deltas == pytest.approx([seeds[0].delta, seeds[1].delta], rel=1e-12)
    assert one.delta == pytest.approx((seeds[0].delta + seeds[1].delta) / 2, rel=1e-12)
    assert len(list((out / "contexts").glob("shuffled-*.jsonl"))) == 2  # one per seed, beside the source's
    assert len(list((out / "contexts").glob("self-sft-*.jsonl"))) == 2
    html = (out / "report.html").read_text()
    assert "against the placebo" in html and "shuffled:user-data" in html


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))


def test_quick_grid_end_to_end_and_resume_after_a_kill(tmp_path, tiny_model_dir, home, monkeypatch, capsys):
    from dpolab.experiment import runner
    from dpolab.experiment.results import read_results

    spec = load_spec(write_spec(tmp_path, tiny_spec(tiny_model_dir)))
    out = tmp_path / "run"
    report = runner.run_experiment(spec, out, progress=False, stop_after_cells=1)
    first = out / "cells" / "resist-only__dpo__s0" / "cell.json"
    assert first.exists() and len(report.rows) > 0
    stamp = first.stat().st_mtime_ns

    # a kill in the middle of the second cell's training
    import dpolab.training.loop as loop

    real_train = loop.train

    def killed(*args, **kwargs):
        def die(step, metrics):
            raise KeyboardInterrupt
        return real_train(*args, on_step=die, **kwargs)

    monkeypatch.setattr(loop, "train", killed)
    with pytest.raises(KeyboardInterrupt):  # no estimate: its calibration would train, and be killed, first
        runner.run_experiment(spec, out, resume=True, progress=False, estimate=False)
    assert (out / "cells" / "length-biased-judge__dpo__s0" / "train").exists()
    assert not (out / "cells" / "length-biased-judge__dpo__s0" / "cell.json").exists()
    monkeypatch.setattr(loop, "train", real_train)

    with pytest.raises(ConfigError, match="--resume"):
        runner.run_experiment(spec, out, progress=False)
    capsys.readouterr()
    report = runner.run_experiment(spec, out, resume=True, progress=False)
    assert report.skipped == ["resist-only__dpo__s0"]
    # its log (stdout is not a terminal here) says so, and numbers the cells in the whole grid: 2/3 and 3/3
    log = [line.split("] ", 1)[1].split(";")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert log[0] == "resuming: 1 of 3 cells already finished"
    assert [x for x in log if x.endswith(": started")] == ["cell 2/3 length-biased-judge__dpo__s0: started",
                                                          "cell 3/3 length-biased-judge__odpo__s0: started"]
    assert "baseline eval" not in " ".join(log)  # the baseline was kept
    assert first.stat().st_mtime_ns == stamp  # the finished cell was not redone
    rows = read_results(out / "results.parquet")
    cells = {(r.context, r.method) for r in rows}
    assert cells == {("resist-only", "dpo"), ("length-biased-judge", "dpo"), ("length-biased-judge", "odpo")}
    assert {r.verdict for r in rows} <= {"improved", "harmed", "no clear change"}
    assert all(r.baseline is not None for r in rows if r.metric == "acc@0")
    html = (out / "report.html").read_text()
    assert "length-biased-judge" in html and "resist-only" in html
    pairs = list((out / "contexts").glob("length-biased-judge-*.jsonl"))  # the scores ODPO trained on
    assert pairs and all(json.loads(line)["score_chosen"] > json.loads(line)["score_rejected"]
                         for line in pairs[0].read_text().splitlines())


def test_run_and_compare_commands(tmp_path, tiny_model_dir, home):
    from typer.testing import CliRunner

    from dpolab.cli import app

    spec = tiny_spec(tiny_model_dir, contexts={"length-biased-judge": {"options": {"n_instructions": 6, "max_new_tokens": 400}}})
    path = write_spec(tmp_path, spec)
    runner = CliRunner()
    a = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "a")], terminal_width=400)
    assert a.exit_code == 0, a.output
    assert "What moved" in a.output
    from dpolab.experiment.results import read_results
    from dpolab.experiment.summary import behaviours

    # the printed matrix carries every headline delta and CI of the run's results.parquet
    heads = {(b.probe, b.metric) for b in behaviours()}
    shown = [r for r in read_results(tmp_path / "a" / "results.parquet") if (r.probe, r.metric) in heads]
    assert shown
    for r in shown:
        no_ci = math.isnan(r.delta_ci_low) and math.isnan(r.delta_ci_high)
        assert f"{r.delta:+.3f}" + (" (no CI)" if no_ci else "") in a.output
        assert no_ci or f"[{r.delta_ci_low:+.3f}," in a.output
    spec["train"]["lr"] = 5e-3
    b = runner.invoke(app, ["run", str(write_spec(tmp_path, spec)), "--out", str(tmp_path / "b")])
    assert b.exit_code == 0, b.output
    diff = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--all"])
    assert diff.exit_code == 0 and "A = " in diff.output

    import io

    from rich.console import Console

    from dpolab.experiment.summary import compare_runs

    # every row of both runs is listed, with both values
    printed = io.StringIO()
    compare_runs(tmp_path / "a", tmp_path / "b", show_all=True,
                 console=Console(file=printed, width=400, force_terminal=True, color_system=None))  # the table
    rows_b = {(r.probe, r.metric): r for r in read_results(tmp_path / "b" / "results.parquet")}
    for r in read_results(tmp_path / "a" / "results.parquet"):
        other = rows_b[(r.probe, r.metric)]
        line = next(x for x in printed.getvalue().splitlines()
                    if [c.strip() for c in x.split("│")][2:4] == [r.probe, r.metric])  # probe and metric columns
        for x in (r, other):  # the value, then its CI or "(no CI)" when it has none
            no_ci = math.isnan(x.ci_low) and math.isnan(x.ci_high)
            assert f"{x.value:.3f} " + ("(no CI)" if no_ci else "[") in line

    rows = compare_runs(tmp_path / "a", tmp_path / "b", show_all=True)
    assert rows and all(r["key"][0] == "length-biased-judge" and r["a"] and r["b"] for r in rows)
    assert compare_runs(tmp_path / "a", tmp_path / "a") == []  # a run does not differ from itself
    missing = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "nowhere")])
    assert missing.exit_code != 0


def test_care_contexts_and_probes_end_to_end_with_the_report(tmp_path, tiny_model_dir, home):
    """risky-choices trained on the tiny model and evaluated by the care probes: result rows for their metrics, and
    the report's care sections with example replies, escaped. (The random model's replies hold no advice to rank,
    so satisfaction-therapist is tested on scripted replies in test_care.py.)"""
    import pyarrow.parquet as pq
    from markupsafe import escape

    from dpolab.experiment import runner
    from dpolab.experiment.results import read_results

    contexts = {"risky-choices": {"options": {"n_lotteries": 8}}}
    spec = tiny_spec(tiny_model_dir, contexts=contexts)
    spec["probes"] = {"names": ["reply_style", "mental_health", "risk"],
                      "sizes": {"reply_style": {"n_disclosures": 3, "n_requests": 3, "max_new_tokens": 12},
                                "mental_health": {"n_vignettes": 2, "n_delusions": 2, "n_crisis": 2,
                                                  "max_new_tokens": 12},
                                "risk": {"n_lotteries": 10}}}
    out = tmp_path / "run"
    runner.run_experiment(load_spec(write_spec(tmp_path, spec)), out, progress=False)
    rows = read_results(out / "results.parquet")
    assert {(r.context, r.probe) for r in rows} >= {(c, p) for c in contexts for p in ("reply_style", "mental_health",
                                                                                       "risk")}
    risk = next(r for r in rows if r.context == "risky-choices" and r.metric == "risky_choice")
    assert risk.n == 10 and risk.verdict is not None
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Example replies" in html and "Reply style" in html and "Mental health" in html
    # the examples' texts reach the page escaped (the tiny model's replies are blank lines here; the prompts, with
    # their apostrophes, show it)
    prompts = [r["prompt"] for r in pq.read_table(out / "baseline" / "reply_style.parquet").to_pylist()]
    shown = [p for p in prompts if "'" in p and str(escape(p)) in html]
    assert shown and not any(p in html for p in shown)


def test_the_narrow_preset_names_its_contexts_methods_and_probes():
    narrow = load_spec(preset="narrow")
    assert set(narrow.contexts) == {"safety-tuning", "suppress-pattern", "agree-with-partner"}
    assert narrow.methods["dpo-emphasis"].train == {"emphasis": 3.0}
    assert ("agree-with-partner", "dpo-consistency", 0) in narrow.cells()
    assert {"roleplay", "pattern_rate", "partner", "knowledge"} == set(narrow.probes.names)


def test_narrow_contexts_and_probes_end_to_end(tmp_path, tiny_model_dir, home):
    """agree-with-partner trained with plain DPO and with the counterfactual-consistency term, safety-tuning on the
    tiny model's own replies, evaluated by the partner, role-play and pattern probes: a result row per cell and
    probe, and the two partner cells trained to different models. (suppress-pattern needs replies with the pattern,
    which a random model does not write: tests/test_pattern.py builds it from scripted replies.)"""
    from dpolab.experiment import runner
    from dpolab.experiment.results import read_results

    contexts = {"agree-with-partner": {"methods": ["dpo", "dpo-consistency"], "options": {"n_items": 4}},
                "safety-tuning": {"options": {"n_requests": 4, "max_new_tokens": 12}}}
    spec = tiny_spec(tiny_model_dir, contexts=contexts)
    spec["methods"]["dpo-consistency"] = {"loss": "dpo", "train": {"consistency_weight": 1.0}}
    spec["probes"] = {"names": ["partner", "roleplay", "pattern_rate"],
                      "sizes": {"partner": {"n_items": 4}, "roleplay": {"n_per_level": 1, "max_new_tokens": 8},
                                "pattern_rate": {"n_invite": 3, "n_neutral": 2, "max_new_tokens": 8,
                                                 "n_references": 2}}}
    out = tmp_path / "run"
    runner.run_experiment(load_spec(write_spec(tmp_path, spec)), out, progress=False)
    rows = read_results(out / "results.parquet")
    cells = {("agree-with-partner", "dpo"), ("agree-with-partner", "dpo-consistency"), ("safety-tuning", "dpo")}
    assert {(r.context, r.method, r.probe) for r in rows} >= {(c, m, p) for c, m in cells
                                                              for p in ("partner", "roleplay", "pattern_rate")}
    uptake = {r.method: r.value for r in rows if r.context == "agree-with-partner" and r.metric == "uptake:helpful"}
    assert uptake["dpo"] != uptake["dpo-consistency"]  # the term changed the training


def test_a_method_kind_resumes_from_its_own_folder_after_a_cut(tmp_path, tiny_model_dir, monkeypatch):
    """A registered method kind's folder (cell/<kind>) survives when the runner restarts a cell cut short; the
    rest of the cell starts over."""
    from dataclasses import dataclass

    from dpolab.experiment.runner import run_experiment
    from dpolab.experiment.spec import load_spec
    from dpolab.methods import METHOD_KINDS, MethodKind, Tuned
    from dpolab.models.load import load_model

    @dataclass(frozen=True, kw_only=True)
    class NoOptions:
        pass

    calls = []

    def run(job):
        marker = job.work / "half-done"
        calls.append(marker.exists())
        if not marker.exists():
            marker.write_text("stage 1")
            (job.work.parent / "eval").mkdir(exist_ok=True)
            (job.work.parent / "eval" / "stale").write_text("")
            raise KeyboardInterrupt  # killed mid-cell
        return Tuned(model=load_model(job.model_name).model, steps=0, info={"resumed": True})

    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(METHOD_KINDS._entries, "fake", "tests.test_run:unused")
    monkeypatch.setitem(METHOD_KINDS._cache, "fake", MethodKind(name="fake", options=NoOptions, run=run))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"u{i}", "prompt": f"Say {i}.", "chosen": f"Yes {i}.",
                                        "rejected": f"No {i}!"}) + "\n" for i in range(4)))
    spec = tiny_spec(tiny_model_dir, contexts={"user-data": {"methods": ["f"], "options": {"path": str(data)}}})
    spec["methods"] = {"f": {"kind": "fake"}}
    spec["probes"] = {"names": ["knowledge"], "sizes": {"knowledge": {"n_items": 4, "n_chunks": 2}}}
    out = tmp_path / "run"
    loaded = load_spec(write_spec(tmp_path, spec))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(loaded, out, progress=False)
    cell = out / "cells" / "user-data__f__s0"
    assert (cell / "fake" / "half-done").exists() and (cell / "eval" / "stale").exists()
    run_experiment(loaded, out, resume=True, progress=False)
    assert calls == [False, True]
    assert (cell / "fake" / "half-done").exists() and not (cell / "eval" / "stale").exists()
    assert json.loads((cell / "cell.json").read_text())["fake"] == {"resumed": True}
