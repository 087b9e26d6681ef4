"""The run's time, stated at its start: work counted on a scripted model and scaled from a timed small run, the
estimate refined from finished cells, and what `dpolab run` prints and writes to timings.json."""
from __future__ import annotations

import json
import re

import pytest

from dpolab.experiment.estimate import CellCost, Costs, Estimate, Tally, calibrate, scaled
from dpolab.models.fake import FakeChatModel
from dpolab.probes.run import run_eval
from tests.test_run import TINY_SIZES, tiny_spec, write_spec

# a machine whose decode step of a full batch of 4 costs 2.5 of one reply's, and a token of a prompt or text 1/64 s
# (exact in binary, so sums stay exact)
COSTS = Costs(generate_batch=4, step_s=(0.5, 1.25), token_s=1 / 64)
# the same with a fixed cost per scoring pass of 3 rows: two items' many small passes cost more than their tokens
PASSES = Costs(generate_batch=4, step_s=(0.5, 1.25), token_s=1 / 64, pass_s=0.25, score_batch=3)


class Clock:
    """A stand-in for the time module: only the clocked model moves it."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class Clocked(Tally):
    """FakeChatModel whose every request takes the seconds COSTS says on `clock`: a machine whose costs are known
    exactly."""

    def __init__(self, clock: Clock, costs: Costs = COSTS):
        super().__init__(FakeChatModel(), costs)
        self.clock = clock

    def _timed(self, request, *args, **kwargs):
        before = self.total
        out = request(*args, **kwargs)
        self.clock.now += self.total - before
        return out

    def generate(self, *args, **kwargs):
        return self._timed(super().generate, *args, **kwargs)

    def score_continuations(self, *args, **kwargs):
        return self._timed(super().score_continuations, *args, **kwargs)

    def next_token_logprobs(self, *args, **kwargs):
        return self._timed(super().next_token_logprobs, *args, **kwargs)

    def score_texts(self, *args, **kwargs):
        return self._timed(super().score_texts, *args, **kwargs)


def test_tally_counts_each_probes_work_apart():
    fake = FakeChatModel()
    one_by_one = Costs(generate_batch=1, step_s=(1.0, 1.0), token_s=0.0)  # a decode step per reply, prompts free
    tally = Tally(fake, one_by_one)
    run_eval(tally, probes="verbosity,toxicity", sizes=TINY_SIZES, n_boot=100)
    # generated token slots only, as the fake's own log has them: one count per probe
    slots = sum(len(c.conversations) * c.kwargs["max_new_tokens"] for c in fake.calls)
    assert tally.parts[-1] == 0 and sum(tally.parts) == slots
    for i, probe in enumerate(["verbosity", "toxicity"]):
        alone = Tally(FakeChatModel(), one_by_one)
        run_eval(alone, probes=probe, sizes=TINY_SIZES, n_boot=100)
        assert tally.parts[i] == alone.total > 0
    assert scaled(3.0, full=40, small=4) == 30.0 and scaled(3.0, full=0, small=0) == 3.0


def test_a_fuller_batch_and_a_longer_text_cost_more():
    tally = Tally(FakeChatModel(), COSTS)  # the fake counts a word as a token
    convs = [[{"role": "user", "content": "two words"}] for _ in range(6)]
    tally.generate(convs, max_new_tokens=8)
    # a batch of 4 (8 steps at 1.25 s) and one of 2 (8 steps at 0.5 + 0.75 / 3 s), and 12 prompt tokens
    assert tally.total == 8 * 1.25 + 8 * 0.75 + 12 / 64
    tally.score_texts(["one", "one two three"])
    tally.score_continuations([[{"role": "user", "content": "a b"}]], [["c", "d e"]])
    tally.next_token_logprobs([[{"role": "user", "content": "a b"}]], ["A", "B"], prefix="The")
    assert tally.total == 8 * 1.25 + 8 * 0.75 + (12 + 4 + (3 + 4) + 3) / 64


def test_a_scoring_call_pays_for_its_passes():
    tally = Tally(FakeChatModel(), PASSES)
    tally.score_texts(["a"] * 7)  # 7 rows in passes of 3: 3 passes
    assert tally.total == 3 * 0.25 + 7 / 64
    tally.generate([[{"role": "user", "content": "a b"}]], max_new_tokens=2)  # a prompt's prefill is in the steps
    assert tally.total == 3 * 0.25 + 7 / 64 + 2 * 0.5 + 2 / 64


def test_measured_costs_separate_the_pass_from_the_tokens():
    """On a machine whose scoring call costs passes * pass_s + tokens * token_s, measure_costs finds both."""
    from dpolab.experiment.estimate import measure_costs

    clock = Clock()
    base = Clocked(clock, PASSES)
    base.score_batch_size = PASSES.score_batch
    costs = measure_costs(base, generate_batch=4, clock=clock.perf_counter)
    assert costs.pass_s == pytest.approx(PASSES.pass_s, abs=1e-9) and costs.token_s == pytest.approx(PASSES.token_s)
    assert costs.score_batch == PASSES.score_batch


@pytest.mark.parametrize("costs", [COSTS, PASSES], ids=["tokens", "tokens-and-passes"])
def test_the_eval_estimate_from_a_small_run_is_the_full_runs_time_on_a_machine_of_known_costs(monkeypatch, tmp_path,
                                                                                               costs):
    """Timed at --limit 2 and scaled by the work counted at both sizes, each probe's estimate is what the full-size
    eval then takes, when the machine's time is proportional to the work."""
    import dpolab.probes.run as run_mod
    from dpolab.experiment.spec import load_spec

    clock = Clock()
    monkeypatch.setattr(run_mod, "time", clock)
    spec = load_spec(write_spec(tmp_path, {**tiny_spec("unused"), "probes": {
        "names": ["persuasion", "sycophancy", "toxicity", "verbosity", "knowledge"],
        "sizes": {**TINY_SIZES, "sycophancy": {"n_items": 12}, "toxicity": {"n_prompts": 9, "k": 2, "seeds": [0]}}}}))
    estimate = calibrate(spec, [], base=Clocked(clock, costs), costs=costs, clock=clock.perf_counter)
    full = run_eval(Clocked(clock, costs), probes=spec.probes.names, sizes=spec.probes.sizes, n_boot=100)
    assert set(estimate.probes) == set(spec.probes.names)
    for probe, seconds in estimate.probes.items():
        assert seconds == pytest.approx(full.wall_time_s[probe], rel=1e-3), probe  # both rounded to 0.01 s
    assert estimate.probes["toxicity"] > 2 * estimate.probes["verbosity"] > 0  # the sizes differ, and so do times
    assert estimate.baseline_s == pytest.approx(sum(estimate.probes.values()))
    # a trained model's eval reads stances as the baseline chose: no reader calibrated, never dearer
    cells = estimate.costs["cell_eval_probes_s"]
    assert all(cells[p] <= round(s, 1) + 0.05 for p, s in estimate.probes.items()) and cells["persuasion"] < estimate.probes["persuasion"]
    small = run_eval(Clocked(clock, costs), probes=spec.probes.names, sizes=spec.probes.sizes, limit=2, n_boot=100)
    assert estimate.calibration_s == pytest.approx(small.wall_time_s["total"], abs=0.01)  # the small run, same clock
    assert estimate.cells == []


def _cost(name: str, pairs: tuple[str | None, float], tune: tuple[str, float], evals: float) -> CellCost:
    return CellCost(name=name, seconds={"pairs": pairs[1], "tune": tune[1], "eval": evals},
                    keys={"pairs": pairs[0], "tune": tune[0], "eval": "eval"}, group=name)


def test_what_is_left_is_priced_by_the_cells_that_finished():
    cells = [
        _cost("a0", ("a", 10.0), ("a/dpo", 30.0), 40.0),
        _cost("a1", ("a", 10.0), ("a/dpo", 30.0), 40.0),  # another seed: its pairs are built again
        _cost("shuffled:a0", (None, 0.0), ("a/dpo", 30.0), 40.0),  # its source's pairs, built already
        _cost("b0", ("b", 10.0), ("b/dpo", 60.0), 40.0),
    ]
    estimate = Estimate(cpu="x", threads=2, calibration_s=5.0, probes={"p": 40.0}, baseline_s=40.0, cells=cells,
                        spent_s=15.0)
    assert estimate.at_start_s == 15 + 40 + (80 + 80 + 70 + 110)
    assert estimate.remaining({}) == 80 + 80 + 70 + 110
    # a0 took pairs 20 (twice its estimate), tune 30 (as estimated), eval 50
    measured = {"a0": {"pairs": 20.0, "tune": 30.0, "eval": 50.0}}
    # a1 and shuffled:a0 share a0's keys: a0's own times; b0's pairs have no like, so its estimate x 2 (how far
    # a0's ran over), its training its estimate x 1, its eval a0's
    assert estimate.remaining(measured) == (20 + 30 + 50) + (30 + 50) + (20 + 60 + 50)
    # the running cell counts less the time it has had, and never below zero
    assert estimate.remaining(measured, running="a1", running_s=40.0) == 60 + 80 + 130
    assert estimate.remaining(measured, running="a1", running_s=500.0) == 80 + 130
    # an edit's training was not timed (0 s): once one has run, the others of its key take its time
    edit = Estimate(cpu="x", threads=2, calibration_s=1.0, probes={}, baseline_s=0.0, cells=[
        _cost("e0", (None, 0.0), ("a/profs", 0.0), 40.0), _cost("e1", (None, 0.0), ("a/profs", 0.0), 40.0)])
    assert edit.remaining({"e0": {"tune": 12.0, "eval": 40.0}}) == 12 + 40


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))


def _timings(out) -> dict:
    return json.loads((out / "timings.json").read_text())


def test_run_states_its_estimate_refines_it_after_each_cell_and_resumes_with_the_baselines_time(
        tmp_path, tiny_model_dir, home, capsys):
    from dpolab.bench.hardware import cpu_label
    from dpolab.experiment import runner
    from dpolab.experiment.results import read_results
    from dpolab.experiment.spec import load_spec
    from dpolab.probes.summary import EvalSummary

    contexts = {"length-biased-judge": {"placebos": ["shuffled"], "options": {"n_instructions": 6, "max_new_tokens": 400}}}
    data = tiny_spec(tiny_model_dir, contexts=contexts)
    data["probes"] = {"names": ["verbosity", "toxicity"], "sizes": TINY_SIZES}
    spec = load_spec(write_spec(tmp_path, data))
    out = tmp_path / "run"
    runner.run_experiment(spec, out, progress=False, stop_after_cells=1, estimate=True)
    log = capsys.readouterr().out  # not a terminal: a log
    said = [x for x in log.splitlines() if "] estimate: " in x]
    assert len(said) == 1 and re.search(r"estimate: about .+ in all on " + re.escape(cpu_label())
                                        + r", \d+ threads? \(calibrated in .+; refined after each cell\)", said[0]), log
    assert "  baseline eval " in log and "  length-biased-judge/dpo x 1: pairs " in log  # the breakdown, in a log
    first = _timings(out)["estimate"]
    assert first["cpu"] == cpu_label() and 0 < first["calibration_s"] < first["at_start_s"]
    assert list(first["breakdown"]["cells"]) == ["length-biased-judge__dpo__s0"]
    assert first["breakdown"]["baseline_eval_s"] > 0
    assert [n for n, _ in first["updates"]] == [1] and first["updates"][0][1] > 0
    assert f"at its start on {cpu_label()} (calibrated in " in (out / "report.html").read_text()  # and the report

    runner.run_experiment(spec, out, resume=True, progress=False, estimate=True)
    assert "] estimate: about " in capsys.readouterr().out
    again = _timings(out)["estimate"]
    baseline = EvalSummary.read(out / "baseline" / "summary.json")
    # resumed with its baseline: no eval is timed again, the baseline's seconds per probe stand for every cell's
    assert again["breakdown"]["probes_s"] == {p: round(s, 1) for p, s in baseline.wall_time_s.items() if p != "total"}
    assert again["breakdown"]["baseline_eval_s"] == 0
    assert list(again["breakdown"]["cells"]) == ["shuffled:length-biased-judge__dpo__s0"]
    assert [n for n, _ in again["updates"]] == [2]  # cells finished in the whole grid

    # --no-estimate: no calibration, nothing said, no estimate in timings.json; the same results, since the
    # calibration leaves the run's random draws alone
    plain = tmp_path / "plain"
    runner.run_experiment(spec, plain, progress=False, estimate=False)
    assert "estimate" not in capsys.readouterr().out and "estimate" not in _timings(plain)
    rows = {(r.context, r.probe, r.metric): r.value for r in read_results(out / "results_by_seed.parquet")}
    assert rows == {(r.context, r.probe, r.metric): r.value for r in read_results(plain / "results_by_seed.parquet")}


def test_a_method_kind_is_priced_by_what_it_samples():
    """rl, iterative and curriculum sample replies of their own: priced as the probes' are, in the engine's batches,
    besides their plain training (and RL's PPO passes over its rollouts)."""
    from dpolab.experiment.estimate import _Training, kind_sampling_s
    from dpolab.methods import METHOD_KINDS

    # 10 replies of 8 tokens in batches of 4: two full batches (step 1.25 s) and one of 2 (0.5 + 0.75 / 3)
    assert COSTS.decoding(10, 8) == 8 * (2 * 1.25 + 0.75)
    training = _Training(fixed_s=0.0, token_s=1 / 32)
    rl = METHOD_KINDS.get("rl").make_options({"steps": 2, "prompts_per_step": 3, "group_size": 2, "max_new_tokens": 8,
                                              "epochs_per_batch": 2, "reward": "toxicity"})
    # 12 replies; a sampled sequence is half a pair's 20 tokens; 2 PPO epochs over them at the training's rate
    want = COSTS.decoding(12, 8) + 12 * 10 / 64 + 2 * 12 * 10 / 32
    assert kind_sampling_s("rl", rl, COSTS, prompts=5, tokens=20, training=training, max_new_tokens=None) == want
    it = METHOD_KINDS.get("iterative").make_options({"rounds": 3, "k": 2, "judge": "length"})
    # (3 rounds + the final model) x 5 prompts x 2 replies, at the context's 16 tokens
    assert kind_sampling_s("iterative", it, COSTS, prompts=5, tokens=20, training=training, max_new_tokens=16) == \
        COSTS.decoding(40, 16) + 40 * 10 / 64
    curry = METHOD_KINDS.get("curriculum").make_options({"k": 4, "judge": "length"})
    assert kind_sampling_s("curriculum", curry, COSTS, prompts=5, tokens=20, training=training, max_new_tokens=None) \
        == COSTS.decoding(20, 64) + 20 * 10 / 64  # no max_new_tokens anywhere: 64
    assert kind_sampling_s("train", None, COSTS, prompts=5, tokens=20, training=training, max_new_tokens=None) == 0.0
