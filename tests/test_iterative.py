"""Method kind `iterative` (iterative online DPO; iLR-DPO with the rdpo loss) on the tiny model with a fake judge:
each round samples from the previous round's model and trains against it, a round cut short resumes from its own
samples and the trainer's checkpoint, and a spec with kind iterative runs end to end through the runner."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import yaml

from dpolab.errors import ConfigError
from dpolab.judges import JUDGES
from dpolab.methods import METHOD_KINDS, CellJob

PROMPTS = ["Say something about rivers.", "Name a colour.", "How are you?", "Tell me a joke.", "Count to three.",
           "What is rain?", "Spell cat.", "Why is the sky blue?", "Greet me.", "Pick a number."]  # 10: a bootstrap CI


@dataclass
class ChecksumJudge:
    """A fake judge: a deterministic score from the reply's characters, so replies rarely tie."""

    name: str = "checksum"

    def score(self, conversations: Sequence, replies: Sequence[str]) -> list[float]:
        return [float(sum(ord(c) * (i + 1) for i, c in enumerate(r)) % 997) for r in replies]


@dataclass
class ConstantJudge:
    """A fake judge that likes everything the same: every prompt is a tie."""

    name: str = "constant"

    def score(self, conversations: Sequence, replies: Sequence[str]) -> list[float]:
        return [1.0 for _ in replies]


@pytest.fixture
def checksum(monkeypatch):
    monkeypatch.setitem(JUDGES._entries, "checksum", "tests.test_iterative:ChecksumJudge")
    monkeypatch.setitem(JUDGES._entries, "constant", "tests.test_iterative:ConstantJudge")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))  # the trainer's reference cache stays in the test


def context_pairs(tmp_path):
    path = tmp_path / "context.jsonl"
    rows = [{"id": f"p{i}", "prompt": p, "chosen": f"Yes {i}.", "rejected": f"No {i}!"} for i, p in enumerate(PROMPTS)]
    rows.append({"id": "p0-again", "prompt": PROMPTS[0], "chosen": "Again.", "rejected": "Never!"})  # same prompt
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_job(tmp_path, model_dir, *, base=None, options=None, work="work", source="user-data", context_options=None,
             loss="dpo", loss_args=None, **train) -> CellJob:
    from dpolab.config import TrainConfig

    if base is None:
        from dpolab.models.backends import chat_model
        from dpolab.models.load import load_model

        base = chat_model(load_model(str(model_dir)), backend="hf")
    keys = {"lr": 1e-3, "batch_size": 2, "max_steps": 2, "save_every": 1000, "progress": False, **train}
    cfg = TrainConfig(model=str(model_dir), data=str(context_pairs(tmp_path)), out=str(tmp_path / "unused"), loss=loss,
                      loss_args=loss_args or {}, **keys)
    opts = METHOD_KINDS.get("iterative").make_options(
        {"rounds": 2, "k": 3, "judge": "checksum", "max_new_tokens": 8, **(options or {})})
    (tmp_path / work).mkdir(exist_ok=True)
    return CellJob(config=cfg, options=opts, base=base, model_name=str(model_dir), context=source, source=source,
                   context_options=context_options or {}, seed=0, work=tmp_path / work, say=lambda line: None)


def round_pairs(work, r: int) -> list[tuple[str, str, str]]:
    rows = [json.loads(line) for line in (work / f"round-{r}" / "pairs.jsonl").read_text().splitlines()]
    return [(row["id"], row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in rows]


# -- options --------------------------------------------------------------------------------------------------------


def test_options_errors_list_valid_keys(checksum):
    kind = METHOD_KINDS.get("iterative")
    with pytest.raises(ConfigError, match="roundz.*choose from rounds, k, judge, judge_args, max_new_tokens"):
        kind.make_options({"roundz": 2})
    with pytest.raises(ConfigError, match="k must be at least 2"):
        kind.make_options({"k": 1})
    with pytest.raises(ConfigError, match="did you mean 'length'"):
        kind.make_options({"judge": "lenght"})
    with pytest.raises(ConfigError, match="unknown option.*temprature for judge 'model'; choose from model, template"):
        kind.make_options({"judge": "model", "judge_args": {"temprature": 0}})
    opts = kind.make_options({"rounds": "2"})
    assert (opts.rounds, opts.k, opts.judge, opts.prompts_per_round) == (2, 4, None, None)


def test_a_bad_option_fails_when_the_spec_loads(tmp_path, tiny_model_dir):
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    spec = tiny_spec(tiny_model_dir, contexts={"detox": {"methods": ["it"]}})
    spec["methods"] = {"it": {"kind": "iterative", "options": {"round": 2}}}
    with pytest.raises(ConfigError, match="round.*choose from rounds"):
        load_spec(write_spec(tmp_path, spec))


def test_the_judge_defaults_to_the_contexts_own(tmp_path, tiny_model_dir):
    from dpolab.methods.iterative import settings
    from dpolab.models.fake import FakeChatModel

    fake = FakeChatModel()
    detox = make_job(tmp_path, tiny_model_dir, base=fake, source="detox", context_options={"scorer": "detoxify"},
                     options={"judge": None})
    s = settings(detox)
    assert (s.judge_name, s.judge.scorer) == ("toxicity", "detoxify")  # the context's scorer
    assert (s.max_new_tokens, s.temperature) == (8, 1.0)
    assert [p.id for p in s.prompts] == [f"p{i}" for i in range(len(PROMPTS))]  # distinct prompts, file order
    length = settings(make_job(tmp_path, tiny_model_dir, base=fake, source="length-biased-judge",
                               options={"judge": None, "max_new_tokens": None}))
    assert length.judge_name == "length" and length.judge.score([[]], ["one two three"]) == [3.0]  # base's tokens
    assert length.max_new_tokens == 160  # the context's own default
    with pytest.raises(ConfigError, match="needs a judge.*toxicity, length, correctness, model, endpoint"):
        settings(make_job(tmp_path, tiny_model_dir, base=fake, options={"judge": None}))


def test_pairs_are_best_over_worst_with_ties_and_unusable_counted():
    from dpolab.methods.iterative import _pairs

    def item(pid, *scored):
        return {"prompt_id": pid, "prompt": [{"role": "user", "content": pid}],
                "replies": [{"text": t, "score": s, "n_tokens": len(t), "hit_limit": False} for t, s in scored]}

    samples = {"model": "m", "fingerprint": "f", "items": [
        item("a", ("mid", 0.5), ("best", 0.9), ("worst", 0.1), ("best too", 0.9)),
        item("tie", ("x", 1.0), ("y", 1.0)),
        item("same", ("z", 1.0), ("z", 2.0)),  # identical texts: no pair whatever the judge said
        item("blank", ("  ", 3.0), ("ok", 1.0)),
        item("nan", ("p", math.nan), ("q", 1.0), ("<|im_end|>", 0.0)),
    ]}
    made = _pairs(samples, r=2, judge="j", specials=("<|im_end|>",))
    assert [(r["id"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["score_chosen"], r["score_rejected"])
            for r in made.rows] == [("r2/a", "best", "worst", 0.9, 0.1)]
    assert made.rows[0]["meta"]["round"] == 2 and made.rows[0]["meta"]["policy_fingerprint"] == "f"
    assert (made.ties, made.unusable) == (2, 2)


def test_prompts_per_round_takes_a_new_seeded_slice_each_round():
    from dpolab.methods.iterative import Prompt, round_prompts

    prompts = [Prompt(id=str(i), messages=[]) for i in range(5)]
    rounds = [[p.id for p in round_prompts(prompts, 2, r, seed=3)] for r in range(3)]
    assert len(set(rounds[0] + rounds[1])) == 4 and len(set(rounds[0] + rounds[1] + rounds[2])) == 5  # wraps around
    assert rounds[0] == [p.id for p in round_prompts(prompts, 2, 0, seed=3)]  # the same on a rerun
    assert round_prompts(prompts, None, 4, seed=3) == prompts == round_prompts(prompts, 9, 1, seed=3)


# -- rounds on the tiny model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss, loss_args", [("dpo", {}), ("rdpo", {"alpha": 0.02})])
def test_each_round_samples_from_and_trains_against_the_previous_rounds_model(tmp_path, tiny_model_dir, checksum,
                                                                               home, loss, loss_args):
    from dpolab.methods.iterative import run
    from dpolab.models.load import load_model, weights_fingerprint

    job = make_job(tmp_path, tiny_model_dir, loss=loss, loss_args=loss_args, options={"keep_models": True})
    tuned = run(job)
    info = tuned.info
    rounds = info["rounds"]
    assert len(rounds) == 2 and tuned.steps == 4 == sum(r["steps"] for r in rounds)
    assert (info["loss"], info["loss_args"], info["judge"]) == (loss, loss_args, "checksum")

    starts = [str(tiny_model_dir), str(job.work / "round-0" / "train" / "model")]
    prints = [weights_fingerprint(load_model(p).model) for p in
              [*starts, str(job.work / "round-1" / "train" / "model")]]
    assert len(set(prints)) == 3  # every round changed the weights
    for r in range(2):
        samples = json.loads((job.work / f"round-{r}" / "samples.json").read_text())
        assert samples["fingerprint"] == prints[r] == rounds[r]["sampled"]["fingerprint"]  # sampled from M_r
        saved = yaml.safe_load((job.work / f"round-{r}" / "train" / "config.yaml").read_text())
        assert saved["model"] == starts[r] == rounds[r]["start_model"]  # trained from M_r: the reference
        assert (saved["loss"], saved["loss_args"]) == (loss, loss_args)
        first = json.loads((job.work / f"round-{r}" / "train" / "metrics.jsonl").read_text().splitlines()[0])
        # at the first step the policy is the reference, so the rewards are 0: the reference is M_r, not the base
        assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
        assert rounds[r]["loss_first"] == pytest.approx(math.log(2), abs=1e-4) if loss == "dpo" else True
        assert rounds[r]["pairs"] + rounds[r]["ties"] + rounds[r]["unusable"] == len(PROMPTS)
        assert rounds[r]["pairs"] >= 2 and len(round_pairs(job.work, r)) == rounds[r]["pairs"]
        st = rounds[r]["sampled"]
        assert st["samples"] == 3 * len(PROMPTS) and st["judge_ci_low"] <= st["judge_mean"] <= st["judge_ci_high"]
        assert 0 < st["tokens_mean"] <= 8
    # and the test can tell: under the base model round 1's chosen replies are far from M_1's log-probs, so a base
    # reference would give rewards of β × that at the first step
    pairs = [json.loads(line) for line in (job.work / "round-1" / "pairs.jsonl").read_text().splitlines()]
    under_base = job.base.score_continuations([p["prompt"] for p in pairs], [[p["chosen"][0]["content"]] for p in pairs])
    first = json.loads((job.work / "round-1" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(sum(s[0] for s in under_base) / len(pairs) - first["logps/chosen"]) > 0.1
    final = json.loads((job.work / "final" / "samples.json").read_text())
    assert final["fingerprint"] == prints[2] == weights_fingerprint(tuned.model)  # the tuned model is M_2
    assert info["trend"]["model"] == ["M0", "M1", "M2"] and len(info["trend"]["tokens_mean"]) == 3
    for name, key in (("judge", "judge_mean"), ("tokens", "tokens_mean")):  # M_2 − M_0 on the same prompts
        change = info["change"][name]
        assert change["delta"] == pytest.approx(info["final"][key] - rounds[0]["sampled"][key], abs=1e-9)
        assert change["prompts"] == len(PROMPTS) and change["ci_low"] <= change["delta"] <= change["ci_high"]
    assert (job.work / "round-0" / "train" / "model").exists() and not list(job.work.glob("round-*/train/checkpoints"))
    json.dumps(info)  # cell.json can hold it


def test_a_round_without_pairs_trains_nothing_and_keeps_the_model(tmp_path, tiny_model_dir, checksum, home):
    from dpolab.methods.iterative import run
    from dpolab.models.load import weights_fingerprint

    job = make_job(tmp_path, tiny_model_dir, options={"judge": "constant", "rounds": 2, "k": 2, "final_sample": False})
    tuned = run(job)
    assert [(r["pairs"], r["ties"] + r["unusable"], r["steps"], r["model"]) for r in tuned.info["rounds"]] == \
        [(0, len(PROMPTS), 0, str(tiny_model_dir))] * 2
    assert tuned.steps == 0 and (job.work / "round-1" / "pairs.jsonl").read_text() == ""
    assert not (job.work / "round-0" / "train").exists() and tuned.info["final"] is None
    assert weights_fingerprint(tuned.model) == weights_fingerprint(job.base.model)
    assert tuned.model is not job.base.model  # a copy: the runner's base is never handed out as the tuned model


def test_a_round_cut_short_resumes_from_its_samples_and_the_trainers_checkpoint(tmp_path, tiny_model_dir, checksum,
                                                                                home, monkeypatch):
    """Run 1 stops after round 1's sampling, run 2 inside round 1's training (after the step-1 checkpoint), run 3
    finishes: no model is sampled twice, training continues from step 1, and every round's pairs and the final
    model's samples equal those of a run that was never interrupted."""
    from dpolab.methods import iterative
    from dpolab.training import loop

    whole = iterative.run(make_job(tmp_path, tiny_model_dir, options={"k": 2}, work="whole", save_every=1))

    sampled: list[int] = []
    real_sample, real_round, real_train = iterative.sample_replies, iterative.train_round, loop.train

    def counting_sample(policy, prompts, *, seed, **kw):
        sampled.append(seed)  # seed = 1009 × job.seed + round
        return real_sample(policy, prompts, seed=seed, **kw)

    def stop_before_round_1(cfg, *, start, data, out):
        if "round-1" in str(out):
            raise RuntimeError("killed after round 1's sampling")
        return real_round(cfg, start=start, data=data, out=out)

    def stop_at_step_2(*args, **kw):
        def on_step(step, metrics):
            if "round-1" in str(kw.get("out") or kw.get("resume")) and step == 2:
                raise RuntimeError("killed in round 1's training")
        return real_train(*args, on_step=on_step, **kw)

    monkeypatch.setattr(iterative, "sample_replies", counting_sample)
    monkeypatch.setattr(iterative, "train_round", stop_before_round_1)
    job = make_job(tmp_path, tiny_model_dir, options={"k": 2}, save_every=1)
    with pytest.raises(RuntimeError, match="after round 1's sampling"):
        iterative.run(job)
    assert sampled == [0, 1] and (job.work / "round-1" / "pairs.jsonl").exists()
    assert (job.work / "round-0" / "DONE").exists() and not (job.work / "round-1" / "DONE").exists()

    sampled.clear()
    monkeypatch.setattr(iterative, "train_round", real_round)
    monkeypatch.setattr(loop, "train", stop_at_step_2)
    with pytest.raises(RuntimeError, match="in round 1's training"):
        iterative.run(job)
    assert sampled == []  # round 0 is done, round 1's samples are reused
    assert (job.work / "round-1" / "train" / "checkpoints").exists()

    monkeypatch.setattr(loop, "train", real_train)
    resumed = iterative.run(job)
    assert sampled == [2]  # the final model only
    assert resumed.info["rounds"][1]["resumed_from"] == 1 and resumed.info["rounds"][0]["resumed_from"] is None
    assert resumed.steps == whole.steps == 4
    for r in range(2):
        assert round_pairs(job.work, r) == round_pairs(tmp_path / "whole", r) != []
    final, final_whole = (json.loads((w / "final" / "samples.json").read_text()) for w in (job.work, tmp_path / "whole"))
    assert final["fingerprint"] == final_whole["fingerprint"] and final["items"] == final_whole["items"]
    assert resumed.info["trend"] == whole.info["trend"]
    # what is left: the last round's model, no checkpoint of a finished round
    assert not (job.work / "round-0" / "train" / "model").exists() and (job.work / "round-1" / "train" / "model").exists()
    assert not list(job.work.glob("round-*/train/checkpoints"))


def test_an_iterative_cell_runs_end_to_end(tmp_path, tiny_model_dir, home):
    """iLR-DPO with the tiny model as its own judge (model judge, one-byte verdicts) through run_experiment."""
    from dpolab.experiment import runner
    from dpolab.experiment.results import read_results
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    spec = tiny_spec(tiny_model_dir, contexts={"user-data": {"methods": ["ilr"],
                                                             "options": {"path": str(context_pairs(tmp_path))}}})
    spec["methods"] = {"ilr": {"kind": "iterative", "loss": "rdpo", "train": {"loss_args": {"alpha": 0.01}},
                               "options": {"rounds": 2, "k": 2, "judge": "model", "max_new_tokens": 8,
                                           "judge_args": {"model": str(tiny_model_dir), "positive": "Y",
                                                          "negative": "N"}}}}
    spec["probes"] = {"names": ["knowledge"], "sizes": {"knowledge": {"n_items": 4, "n_chunks": 2}}}
    out = tmp_path / "run"
    runner.run_experiment(load_spec(write_spec(tmp_path, spec)), out, progress=False)

    cell = json.loads((out / "cells" / "user-data__ilr__s0" / "cell.json").read_text())
    rounds = cell["iterative"]["rounds"]
    assert len(rounds) == 2 and cell["train_steps"] == sum(r["steps"] for r in rounds) > 0
    assert cell["iterative"]["judge"] == "model" and cell["iterative"]["loss"] == "rdpo"
    assert (out / "cells" / "user-data__ilr__s0" / "iterative" / "round-1" / "DONE").exists()
    assert ("user-data", "ilr") in {(r.context, r.method) for r in read_results(out / "results.parquet")}
