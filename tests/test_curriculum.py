"""Curry-DPO (dpolab.methods.curriculum): pairs and stages worked by hand, the step split, options, the
reference_model key of TrainConfig, each stage's reference weights, resume, and a cell through the runner."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import pytest

from dpolab.errors import ConfigError
from dpolab.methods import curriculum as cur
from dpolab.methods.curriculum import PromptPairs, RankedPair, assign_stages, rank_pairs, single_pairs, split_steps


@dataclass
class HashJudge:
    """A planted rule: a reply's score is a hash of its text, so distinct replies never tie."""

    name: str = "hash"

    def score(self, conversations, replies):
        return [int(hashlib.sha256(r.encode()).hexdigest()[:8], 16) / 2**32 for r in replies]


@pytest.fixture
def hash_judge(monkeypatch):
    from dpolab.judges import JUDGES

    monkeypatch.setitem(JUDGES._entries, "hash", "tests.test_curriculum:HashJudge")
    monkeypatch.setitem(JUDGES._cache, "hash", HashJudge)
    return "hash"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))


# --- pairs, stages, steps: by hand ----------------------------------------------------------------------------

def P(prompt, chosen, rejected, sc, sr, rank):
    return RankedPair(prompt, chosen, rejected, float(sc), float(sr), rank)


def test_pairs_are_the_best_against_each_other_reply_easy_first_with_ties_skipped():
    # ranks: sample 1 (9) > sample 3 (9, later index) > 2 (5) > 0 (2) > 4 (1); sample 3 ties the best
    got = rank_pairs(0, [2, 9, 5, 9, 1])
    assert got.pairs == [P(0, 1, 4, 9, 1, 5), P(0, 1, 0, 9, 2, 4), P(0, 1, 2, 9, 5, 3)]
    assert [p.gap for p in got.pairs] == [8, 7, 4] and got.ties == 1
    # an unusable sample (None) is left out of the ranking; equal rejected scores keep the worse rank first
    got = rank_pairs(7, [None, 6, 3, 3])
    assert got.pairs == [P(7, 1, 3, 6, 3, 3), P(7, 1, 2, 6, 3, 2)] and got.ties == 0
    # the same text twice is a tie even when a judge scored it differently
    got = rank_pairs(2, [5, 4, 3], ["a", "a", "b"])
    assert got.pairs == [P(2, 0, 2, 5, 3, 3)] and got.ties == 1
    assert rank_pairs(0, [None, 4, None]).pairs == [] and rank_pairs(0, [4, 4, 4]).ties == 2


def stage_example() -> list[PromptPairs]:
    """k = 4. Prompt 0: scores [3, 1, 2, 0] -> (0,3) gap 3, (0,1) gap 2, (0,2) gap 1.
    Prompt 1: [5, 5, 4, 4] -> (0,3) gap 1, (0,2) gap 1, (0,1) a tie."""
    return [rank_pairs(0, [3, 1, 2, 0]), rank_pairs(1, [5, 5, 4, 4])]


def ids(stages):
    return [[(p.prompt, p.chosen, p.rejected) for p in s] for s in stages]


def test_stage_s_holds_each_prompts_s_th_pair():
    prompts = stage_example()
    assert [pp.ties for pp in prompts] == [0, 1]
    assert ids(assign_stages(prompts, order="gap", k=4)) == [[(0, 0, 3), (1, 0, 3)], [(0, 0, 1), (1, 0, 2)], [(0, 0, 2)]]
    # merged into 2: positions 0, 1 -> stage 1 (p * 2 // 3 = 0), position 2 -> stage 2
    assert ids(assign_stages(prompts, order="gap", k=4, stages=2)) == [[(0, 0, 3), (0, 0, 1), (1, 0, 3), (1, 0, 2)],
                                                                       [(0, 0, 2)]]
    assert ids(assign_stages(prompts, order="reverse", k=4)) == [[(0, 0, 2), (1, 0, 2)], [(0, 0, 1), (1, 0, 3)], [(0, 0, 3)]]
    assert ids(assign_stages(prompts, order="none", k=4)) == [[(0, 0, 3), (0, 0, 1), (0, 0, 2), (1, 0, 3), (1, 0, 2)]]
    assert [(p.prompt, p.rejected) for p in single_pairs(prompts)] == [(0, 3), (1, 3)]  # (best, worst) each
    # a stage every prompt tied in is dropped, not trained empty
    assert ids(assign_stages([rank_pairs(0, [2, 1, 2])], order="gap", k=3)) == [[(0, 0, 1)]]


@pytest.mark.parametrize("total, counts, expected", [
    (10, [4, 4, 2], [4, 4, 2]),  # exactly proportional
    (5, [3, 1], [3, 2]),  # one each, then 3 by largest remainder: 2.25, 0.75 -> [2, 0] + the 0.75 -> [2, 1]
    (7, [1, 1, 1], [3, 2, 2]),  # equal remainders: the earlier stage first
    (2, [5, 5, 5], [1, 1, 1]),  # fewer steps than stages: one each
])
def test_steps_split_in_proportion_to_pairs(total, counts, expected):
    assert split_steps(total, counts) == expected
    assert sum(expected) == max(total, len(counts))


# --- options and judges ---------------------------------------------------------------------------------------

def test_options_errors_list_the_valid_keys(tmp_path, tiny_model_dir):
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    with pytest.raises(ConfigError, match="stagez.*choose from k, temperature, max_new_tokens, judge, judge_args, order"):
        cur.KIND.make_options({"stagez": 2})
    for bad, message in [({"k": 2}, "k must be at least 3"), ({"k": 4, "stages": 4}, "between 1 and 3"),
                         ({"order": "none", "stages": 2}, "between 1 and 1"), ({"judge": "lenght"}, "did you mean 'length'"),
                         ({"order": "random"}, "order"), ({"budget": "more"}, "budget"),
                         ({"judge": "length", "judge_args": {"nope": 1}}, "nope for judge 'length'; choose from"),
                         ({"judge_args": {"scorer": "profanity"}}, "judge_args needs a judge")]:
        with pytest.raises(ConfigError, match=message):
            cur.KIND.make_options(bad)
    spec = tiny_spec(tiny_model_dir, contexts={"detox": {"methods": ["curry"]}})
    spec["methods"] = {"curry": {"kind": "curriculum", "loss": "dpo", "options": {"stagez": 2}}}
    with pytest.raises(ConfigError, match="stagez.*choose from k, temperature"):
        load_spec(write_spec(tmp_path, spec))


def test_the_judge_defaults_to_the_contexts_own():
    assert cur.pick_judge(cur.Options(), "detox") == "toxicity"
    assert cur.pick_judge(cur.Options(), "length-biased-judge") == "length"
    assert cur.pick_judge(cur.Options(judge="length"), "detox") == "length"
    with pytest.raises(ConfigError, match="context 'user-data' needs a judge.*options.judge.*toxicity, length"):
        cur.pick_judge(cur.Options(), "user-data")


# --- TrainConfig.reference_model --------------------------------------------------------------------------------

def write_rows(path, n=4, *, prefix="Tell me about"):
    rows = [{"id": f"u{i}", "prompt": f"{prefix} {i}.", "chosen": f"Kind words {i}.", "rejected": f"Rude words {i}!"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reference_model_is_the_reference_cached_or_frozen(tmp_path, tiny_model_dir, home):
    """Policy A with reference_model B: the first step's rewards are β·(log π_A − log π_B), log π_B being what B
    itself logs as the policy of a run on the same batch (float64, the same data order); cached and frozen agree,
    and the cache keeps A's and B's log-probs apart."""
    from dpolab.models.tiny import build_tiny_model
    from dpolab.training.loop import train
    from tests.exact import RTOL

    other = build_tiny_model(tmp_path / "b", seed=1)
    data = write_rows(tmp_path / "pairs.jsonl")
    kw = dict(data=str(data), batch_size=4, max_steps=1, lr=1e-3, dtype="float64", progress=False, save_model=False)
    a_on_b = train(model=str(tiny_model_dir), reference_model=str(other), out=str(tmp_path / "ab"), **kw).metrics[0]
    frozen = train(model=str(tiny_model_dir), reference_model=str(other), reference="frozen", out=str(tmp_path / "f"),
                   **kw).metrics[0]
    b_alone = train(model=str(other), out=str(tmp_path / "b-run"), **kw).metrics[0]
    for side in ("chosen", "rejected"):
        expected = 0.1 * (a_on_b[f"logps/{side}"] - b_alone[f"logps/{side}"])
        assert abs(expected) > 1e-3  # A and B differ: a reference left at A would give 0
        scale = 0.1 * (abs(a_on_b[f"logps/{side}"]) + abs(b_alone[f"logps/{side}"]))  # β·|log π|: the rounding's size
        assert a_on_b[f"rewards/{side}"] == pytest.approx(expected, abs=RTOL * scale)
        assert frozen[f"rewards/{side}"] == pytest.approx(a_on_b[f"rewards/{side}"], rel=RTOL)
    cached = sorted(p.name for p in (tmp_path / "home" / "reference-logps").glob("*.safetensors"))
    assert len(cached) == 1  # B's: B alone reused it (its key is its weights), A's own never computed
    with pytest.raises(ConfigError, match="reference_model needs reference auto, cached or frozen"):
        train(model=str(tiny_model_dir), reference_model=str(other), reference="none", out=str(tmp_path / "n"), **kw)


# --- the method on the tiny model -------------------------------------------------------------------------------

def make_job(tmp_path, tiny_model_dir, base, *, work="work", **options):
    from dpolab.config import TrainConfig, load_config
    from dpolab.methods import CellJob

    data = write_rows(tmp_path / "context.jsonl")
    cfg = load_config(TrainConfig, None, {"model": str(tiny_model_dir), "data": str(data), "out": str(tmp_path / "train"),
                                          "lr": 1e-2, "batch_size": 2, "seed": 0, "progress": False, "save_every": 1000})
    opts = cur.KIND.make_options({"k": 3, "max_new_tokens": 6, "judge": "hash", **options})
    return CellJob(config=cfg, options=opts, base=base, model_name=str(tiny_model_dir), context="user-data",
                   source="user-data", context_options={"path": str(data)}, seed=0, work=tmp_path / work,
                   say=lambda line: None)


@pytest.fixture
def base(tiny_model_dir):
    from dpolab.models.backends import chat_model
    from dpolab.models.load import load_model

    return chat_model(load_model(str(tiny_model_dir)), backend="hf")


@pytest.fixture
def reference_fps(monkeypatch):
    """The weights fingerprint each train() keyed its cached reference log-probs by, in call order."""
    from dpolab.training import loop

    seen: list[str] = []
    real = loop.cache_key

    def spy(*, model_fp, **kw):
        seen.append(model_fp)
        return real(model_fp=model_fp, **kw)

    monkeypatch.setattr(loop, "cache_key", spy)
    return seen


def fingerprint(path) -> str:
    from dpolab.models.load import load_model, weights_fingerprint

    return weights_fingerprint(load_model(str(path)).model)


def test_stages_train_easy_to_hard_from_the_previous_stage_and_resume(tmp_path, tiny_model_dir, base, hash_judge, home,
                                                                      reference_fps, monkeypatch):
    from dpolab.training import loop

    job = make_job(tmp_path, tiny_model_dir, base)
    tuned = cur.run(job)
    info = tuned.info
    stage1, stage2 = info["stages"]
    # every prompt's usable replies (a random model's reply may hold a special token) give usable - 1 pairs, none
    # tied under the hash judge: stage 1 the (best, worst) of each, stage 2 (best, second) where there are 3
    rows = [json.loads(line) for line in (job.work / "samples.jsonl").read_text().splitlines()[1:]]
    usable = [sum(s is not None for s in r["scores"]) for r in rows]
    assert info["pairs_skipped_ties"] == 0 and info["unusable_samples"] == 3 * len(rows) - sum(usable)
    assert stage1["pairs"] == sum(u >= 2 for u in usable) == 4 and stage2["pairs"] == sum(u >= 3 for u in usable) >= 2
    assert stage1["mean_rank_rejected"] == sum(usable) / 4 and stage2["mean_rank_rejected"] == 2
    gaps = [{p["meta"]["prompt_id"]: p["meta"]["gap"] for p in map(json.loads, (job.work / "pairs" / f"stage-{s}.jsonl")
                                                                    .read_text().splitlines())} for s in (1, 2)]
    assert all(gaps[0][prompt] > gap > 0 for prompt, gap in gaps[1].items())  # each prompt: easy, then hard
    # equal budget: single-pair DPO on 4 (best, worst) pairs at batch 2 takes 2 steps; the stages share them
    assert info["single_pair_steps"] == 2 and [s["steps"] for s in info["stages"]] == [1, 1] and tuned.steps == 2
    assert info["judge"] == "hash" and math.isfinite(stage2["final_loss"])
    # the references: the base for stage 1, stage 1's saved weights for stage 2
    base_fp, stage1_fp = fingerprint(tiny_model_dir), fingerprint(job.work / "stage-1" / "model")
    assert stage1_fp != base_fp and reference_fps == [base_fp, stage1_fp]
    assert not (job.work / "stage-1" / "checkpoints").exists()  # a finished stage keeps its model, not its optimizer

    # resume after stage 1: no resampling, stage 1 not retrained, stage 2 trained again
    model_file = job.work / "stage-1" / "model" / "model.safetensors"
    mtime = model_file.stat().st_mtime_ns
    import shutil

    shutil.rmtree(job.work / "stage-2")
    calls = []
    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda *a, **kw: calls.append(kw.get("out")) or real_train(*a, **kw))
    monkeypatch.setattr(base, "generate", lambda *a, **kw: pytest.fail("resampled on resume"))
    again = cur.run(job).info
    assert calls == [str(job.work / "stage-2")] and model_file.stat().st_mtime_ns == mtime
    assert [s["resumed"] for s in again["stages"]] == [True, False] and again["samples_reused"]
    assert again["samples_sha"] == info["samples_sha"] and reference_fps[-1] == stage1_fp


def test_without_iterative_reference_every_stage_is_referenced_to_the_base(tmp_path, tiny_model_dir, base, hash_judge,
                                                                           home, reference_fps):
    job = make_job(tmp_path, tiny_model_dir, base, iterative_reference=False)
    info = cur.run(job).info
    base_fp = fingerprint(tiny_model_dir)
    assert fingerprint(job.work / "stage-1" / "model") != base_fp
    assert reference_fps == [base_fp, base_fp] and [s["reference"] for s in info["stages"]] == ["start", "base"]


def test_a_user_context_without_a_judge_fails_before_sampling(tmp_path, tiny_model_dir, base, hash_judge, monkeypatch):
    job = make_job(tmp_path, tiny_model_dir, base)
    job.options = cur.KIND.make_options({"k": 3})
    monkeypatch.setattr(base, "generate", lambda *a, **kw: pytest.fail("sampled without a judge"))
    with pytest.raises(ConfigError, match="options.judge"):
        cur.run(job)


def test_curriculum_and_its_single_pair_baseline_run_through_the_runner(tmp_path, tiny_model_dir, hash_judge, home):
    from dpolab.experiment import runner
    from dpolab.experiment.results import read_results
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    data = write_rows(tmp_path / "pairs.jsonl")
    spec = tiny_spec(tiny_model_dir, contexts={"user-data": {"methods": ["curry", "curry-single"],
                                                             "options": {"path": str(data)}}})
    options = {"k": 3, "judge": "hash", "max_new_tokens": 6}
    spec["train"] = {"lr": 1e-2, "batch_size": 2, "save_every": 1000}
    spec["methods"] = {"curry": {"kind": "curriculum", "loss": "dpo", "options": options},
                       "curry-single": {"kind": "curriculum", "loss": "dpo", "options": {**options, "single_pair": True}}}
    spec["probes"] = {"names": ["knowledge"], "sizes": {"knowledge": {"n_items": 4, "n_chunks": 2}}}
    out = tmp_path / "run"
    runner.run_experiment(load_spec(write_spec(tmp_path, spec)), out, progress=False)

    cells = {m: json.loads((out / "cells" / f"user-data__{m}__s0" / "cell.json").read_text())
             for m in ("curry", "curry-single")}
    curry, single = cells["curry"]["curriculum"], cells["curry-single"]["curriculum"]
    assert len(curry["stages"]) == 2 and len(single["stages"]) == 1 and single["order"] == "single-pair"
    assert curry["samples_sha"] == single["samples_sha"]  # the same replies, sampled in each cell
    assert cells["curry"]["train_steps"] == cells["curry-single"]["train_steps"] == 2  # equal budget
    assert {(r.context, r.method) for r in read_results(out / "results.parquet")} >= {
        ("user-data", "curry"), ("user-data", "curry-single")}
