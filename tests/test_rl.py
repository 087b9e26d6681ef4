"""Method kind `rl` (dpolab.methods.rl, rl_objective): the advantages, clipped loss, KL and aggregation by hand; the
clipped gradient at ratio 1 is the policy gradient; a toy bandit's reward rises; resume equals an uninterrupted run;
a `kind: rl` cell runs end to end."""
from __future__ import annotations

import json
import math
import string
import sys
from dataclasses import dataclass

import pytest
import torch

from dpolab.config import TrainConfig
from dpolab.errors import ConfigError
from dpolab.methods import METHOD_KINDS, CellJob
from dpolab.methods.rl import Options, letter_choice, mcq_reward, named_options, reply_logps
from dpolab.methods.rl_objective import ALGORITHMS, aggregate, group_advantages, k3_kl, ppo_clip, rl_loss
from dpolab.registry import Registry
from tests.exact import assert_same, load_float64

F64 = torch.float64

# -- the maths by hand ---------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    """Two groups of three: [1, 0, 0] and [0, 1, 1]. Group means 1/3 and 2/3; unbiased group std √(1/3) each;
    the batch's six rewards have mean 1/2 and unbiased std √(6·¼/5) = √0.3."""
    r = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=F64)
    centred = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-2 / 3, 1 / 3, 1 / 3]], dtype=F64)
    grpo = group_advantages(r, baseline="group-mean", std="group", eps=0.0)
    assert_same(grpo, centred / math.sqrt(1 / 3))  # 2/√3, −1/√3, ...
    lite = group_advantages(r, baseline="group-mean", std="batch", eps=0.0)
    assert_same(lite, centred / math.sqrt(0.3))
    rloo = group_advantages(r, baseline="leave-one-out", std="none")
    # r_i − mean of the other two: 1 − 0, 0 − (1+0)/2, ...; 0 − (1+1)/2, 1 − (0+1)/2, ...
    assert_same(rloo, torch.tensor([[1.0, -0.5, -0.5], [-1.0, 0.5, 0.5]], dtype=F64))
    # a group whose rewards tie carries no signal, not 0/0
    tied = group_advantages(torch.tensor([[2.0, 2.0, 2.0]], dtype=F64), baseline="group-mean", std="group")
    assert torch.equal(tied, torch.zeros_like(tied))
    with pytest.raises(ValueError, match="group of at least 2"):
        group_advantages(torch.ones(3, 1, dtype=F64), baseline="group-mean", std="none")


def test_the_algorithms_registry_sets_advantages_and_aggregation():
    assert {n: (a.baseline, a.std, a.aggregation) for n, a in ALGORITHMS.items()} == {
        "lite-ppo": ("group-mean", "batch", "token"), "grpo": ("group-mean", "group", "sequence"),
        "rloo": ("leave-one-out", "none", "token")}
    opts = Options(algorithm="grpo", advantage_std="batch")  # an override is an ablation of the algorithm
    assert (opts.std, opts.aggregate) == ("batch", "sequence")


def test_ppo_clip_and_k3_by_hand():
    """ε = 0.2, ratios 1.5, 0.5, 1: with A = +1 the loss is −min(ρ, clip(ρ)) = −1.2, −0.5, −1 (the first clipped);
    with A = −1 it is 1.5, 0.8, 1 (the second clipped)."""
    old = torch.zeros(2, 3, dtype=F64)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]], dtype=F64))
    out = ppo_clip(new, old, torch.tensor([1.0, -1.0], dtype=F64), clip=0.2)
    assert_same(out.losses, torch.tensor([[-1.2, -0.5, -1.0], [1.5, 0.8, 1.0]], dtype=F64))
    assert out.clipped.tolist() == [[True, False, False], [False, True, False]]
    # k3: r − log r − 1 with r = π_ref/π: log r = 0 -> 0; log r = log 2 -> 1 − log 2; log r = −log 2 -> log 2 − ½
    logps = torch.zeros(3, dtype=F64)
    ref = torch.tensor([0.0, math.log(2), -math.log(2)], dtype=F64)
    assert_same(k3_kl(logps, ref), torch.tensor([0.0, 1 - math.log(2), math.log(2) - 0.5], dtype=F64))


def test_aggregation_by_hand_and_across_micro_batches():
    """Replies of 1, 2 and 3 tokens: token-level = (1 + 2+3 + 4+5+6)/6 = 3.5; sequence-level = (1 + 2.5 + 5)/3."""
    losses = torch.tensor([[1.0, 9.0, 9.0], [2.0, 3.0, 9.0], [4.0, 5.0, 6.0]], dtype=F64)  # 9: padding, never counted
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=F64)
    assert float(aggregate(losses, mask, "token")) == pytest.approx(3.5, rel=1e-15)
    assert float(aggregate(losses, mask, "sequence")) == pytest.approx((1 + 2.5 + 5) / 3, rel=1e-15)
    for how in ("token", "sequence"):  # micro-batches with the batch's denominators add up to the batch's loss
        parts = sum(aggregate(losses[rows], mask[rows], how, n_tokens=6.0, n_sequences=3.0) for rows in ([0], [1, 2]))
        assert float(parts) == pytest.approx(float(aggregate(losses, mask, how)), rel=1e-14)
    with pytest.raises(ValueError, match="token, sequence"):
        aggregate(losses, mask, "sum")


# -- the forward and the gradient ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    return load_float64(tiny_model_dir)


def _rows(loaded):
    from dpolab.models.chat import ChatFormat

    fmt = ChatFormat(loaded.tokenizer)
    prompts = [fmt.prompt_ids([{"role": "user", "content": q}]) for q in ("Hi?", "What is two and two?", "Hi?")]
    replies = [fmt.ids("Four.") + [fmt.end_of_turn_id], fmt.ids("4"), fmt.ids("Hello there") + [fmt.end_of_turn_id]]
    return fmt, prompts, replies


def test_reply_logps_match_a_full_forward(model64):
    """Per-token log-probs from the body + chunked head equal log_softmax of the full logits, row by row."""
    fmt, prompts, replies = _rows(model64)
    model = model64.model
    got = reply_logps(model, prompts, replies, pad_id=fmt.pad_id, chunk_tokens=3)  # (3, T)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0]  # (L, V)
        want = logits[len(p) - 1 : len(p) - 1 + len(r)].log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        assert_same(got[i, : len(r)].detach(), want)
        assert torch.equal(got[i, len(r):], torch.zeros_like(got[i, len(r):]))  # padding is 0


@pytest.mark.parametrize("how", ["token", "sequence"])
def test_at_ratio_one_the_clipped_gradient_is_the_policy_gradient(model64, how):
    """With old = new log-probs the clip is inactive and ∇ρ = ∇log π, so the gradient of the clipped loss equals
    that of −A·log π aggregated the same way (the plain policy gradient), parameter by parameter, in float64."""
    fmt, prompts, replies = _rows(model64)
    model = model64.model
    A = torch.tensor([1.3, -0.7, 0.4], dtype=F64)

    def grads(loss_of):
        model.zero_grad(set_to_none=True)
        lp = reply_logps(model, prompts, replies, pad_id=fmt.pad_id)
        mask = (torch.arange(lp.shape[1])[None, :] < torch.tensor([len(r) for r in replies])[:, None]).to(F64)
        loss_of(lp, mask).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    clipped = grads(lambda lp, mask: rl_loss(lp, lp.detach(), A, mask, clip=0.2, aggregation=how).loss)
    plain = grads(lambda lp, mask: aggregate(-A[:, None] * lp, mask, how))
    assert clipped.keys() == plain.keys()
    for name in plain:
        assert_same(clipped[name], plain[name])
    assert any(float(g.abs().max()) > 0 for g in plain.values())  # a gradient that is all zeros proves nothing


# -- rewards ---------------------------------------------------------------------------------------------------------


def test_mcq_replies_are_read_like_the_stance_readers():
    assert [letter_choice(r, 4) for r in ("B", " B.", "(C) because", "**D**: Paris", "A cat", "The answer is B",
                                           "E", "b", "BC", "")] == [1, 1, 2, 3, 0, None, None, None, None, None]
    opts = ["York", "New York", "Paris", "Rome"]
    assert named_options("It is new  york.", opts) == {1}  # the longer option is not also the shorter
    assert named_options("York, not Paris", opts) == {0, 2}
    assert named_options("Romeo", opts) == set()  # whole phrases only

    from dpolab.banks import Item

    item = Item(id="q", domain="knowledge", category="c", question="Capital of Italy?", options=opts, answer=3)
    assert mcq_reward(item, "D. Rome", "letter") == 1.0 and mcq_reward(item, "C", "letter") == 0.0
    assert mcq_reward(item, "The answer is Rome.", "cloze") == 1.0
    assert mcq_reward(item, "Rome or Paris", "cloze") == 0.0  # naming two options is no answer


def test_mcq_prompts_come_from_the_train_split_only():
    from dpolab.banks import read_split
    from dpolab.methods.rl import mcq_task
    from dpolab.stance import mcq_text

    task = mcq_task(Options(n_prompts=None), seed=0)
    split = read_split()
    assert task.ids and set(task.ids) <= set(split["train"]) and not set(task.ids) & set(split["test"])
    assert all(i.startswith("kn-") for i in task.ids)  # knowledge items, not safety ones
    assert task.conversations[0] == [{"role": "user", "content": mcq_text(_item(task.ids[0]))}]
    assert len(mcq_task(Options(n_prompts=5), seed=0).ids) == 5


def _item(item_id):
    from dpolab.banks import bank_items

    return next(it for it in bank_items("train") if it.id == item_id)


# -- the loop on the tiny model ----------------------------------------------------------------------------------------

ALNUM = set(string.ascii_letters + string.digits)
KILL_AT: int | None = None  # the judge call that interrupts a run (the resume test)
_calls = 0


class Killed(Exception):
    pass


@dataclass
class StartsAlnum:
    """A bandit: reward 1 when the reply starts with an ASCII letter or digit. Under the byte-level tiny tokenizer
    that is exactly "the first sampled token is one of 62 bytes", about a quarter of the random model's mass."""

    name: str = "starts-alnum"

    def score(self, conversations, replies):
        global _calls
        _calls += 1
        if KILL_AT is not None and _calls >= KILL_AT:
            raise Killed
        return [float(bool(r) and r[0] in ALNUM) for r in replies]


@pytest.fixture
def bandit(monkeypatch):
    import dpolab.judges

    global _calls
    _calls = 0
    monkeypatch.setattr(dpolab.judges, "JUDGES", Registry("judge", {
        "starts-alnum": "tests.test_rl:StartsAlnum", "toxicity": "dpolab.judges.programmatic:ToxicityJudge"}))


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Q{i}?", "chosen": "a", "rejected": "b"}) + "\n"
                            for i in range(6)))
    return path


def _job(tmp_path, model_dir, data, *, options: dict, lr: float, seed: int = 0, work: str = "rl") -> CellJob:
    # one thread: on a busy machine two threads of a model this small spend their time waiting for each other
    cfg = TrainConfig(model=str(model_dir), data=str(data), out=str(tmp_path / "train"), lr=lr, seed=seed, threads=1)
    return CellJob(config=cfg, options=METHOD_KINDS.get("rl").make_options(options), base=None,
                   model_name=str(model_dir), context="user-data", source="user-data", context_options={}, seed=seed,
                   work=tmp_path / work, say=lambda line: None)


def _expected_reward(model, model_dir, data) -> float:
    """The exact expected bandit reward: the policy's probability that the first reply token is an ASCII letter or
    digit, averaged over the pool's prompts."""
    from dpolab.data.read import read_pairs
    from dpolab.models import load_tokenizer
    from dpolab.models.chat import ChatFormat

    fmt = ChatFormat(load_tokenizer(str(model_dir)))
    good = [fmt.ids(c)[0] for c in sorted(ALNUM)]
    probs = []
    with torch.no_grad():
        for pair in read_pairs(data).pairs:
            logits = model(input_ids=torch.tensor([fmt.prompt_ids(pair.prompt)])).logits[0, -1]  # (V,)
            probs.append(float(logits.softmax(-1)[good].sum()))
    return sum(probs) / len(probs)


@pytest.mark.parametrize("algorithm, seed", [("lite-ppo", 0), ("lite-ppo", 1), ("grpo", 2), ("rloo", 3)])
def test_a_bandit_reward_rises(tmp_path, tiny_model_dir, pairs_file, bandit, algorithm, seed):
    """On the starts-alnum bandit the policy's exact expected reward goes from about 0.25 to more than 0.5 above
    it (0.24 -> 0.97-0.997 in these four runs; every algorithm and seed 0-5 tried ended with sampled rewards 0.94-1)."""
    from dpolab.models.load import load_model

    run = METHOD_KINDS.get("rl").run
    job = _job(tmp_path, tiny_model_dir, pairs_file, lr=2e-2, seed=seed, options={
        "algorithm": algorithm, "reward": "starts-alnum", "steps": 20, "prompts_per_step": 4, "group_size": 4, "epochs_per_batch": 1,
        "max_new_tokens": 1, "save_every": 100})
    before = _expected_reward(load_model(str(tiny_model_dir)).model, tiny_model_dir, pairs_file)
    tuned = run(job)
    after = _expected_reward(tuned.model, tiny_model_dir, pairs_file)
    assert 0.1 < before < 0.4
    assert after > before + 0.5, (before, after)
    curve = tuned.info["reward_curve"]
    assert curve["last"]["value"] > curve["first"]["value"] and tuned.steps == 20
    assert len(tuned.info["per_step"]) == 20 and tuned.info["advantage_std"] == ALGORITHMS[algorithm].std
    assert json.loads((job.work / "rl.json").read_text())["reward"] == "starts-alnum"


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, tiny_model_dir, pairs_file, bandit, monkeypatch):
    """A run killed in its third step resumes from the step-2 checkpoint and ends on exactly the weights of a run
    that was never interrupted (sampling is seeded by step, minibatch order by step and epoch). Two epochs, two
    minibatches and the KL term put the old-log-prob and reference passes in the path."""
    run = METHOD_KINDS.get("rl").run
    options = {"reward": "starts-alnum", "steps": 4, "save_every": 2, "prompts_per_step": 2, "group_size": 2,
               "epochs_per_batch": 2, "minibatches": 2, "kl_coef": 0.1, "max_new_tokens": 3, "algorithm": "grpo"}
    whole = run(_job(tmp_path, tiny_model_dir, pairs_file, lr=1e-2, options=options, work="whole"))

    me = sys.modules[__name__]
    me._calls = 0
    monkeypatch.setattr(me, "KILL_AT", 3)  # the judge of step 3
    cut = _job(tmp_path, tiny_model_dir, pairs_file, lr=1e-2, options=options, work="cut")
    with pytest.raises(Killed):
        run(cut)
    assert sorted(p.name for p in (cut.work / "checkpoints").iterdir()) == ["step-0000002"]
    monkeypatch.setattr(me, "KILL_AT", None)
    resumed = run(cut)

    assert resumed.info["resumed_from"] == 2 and whole.info["resumed_from"] is None
    assert resumed.info["per_step"] == whole.info["per_step"]
    a, b = dict(whole.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.steps == whole.steps == 4 * 2 * 2
    assert whole.info["per_step"][0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1 samples the reference itself

    changed = {**options, "clip": 0.3, "steps": 2}  # other settings: the step-2 checkpoint is not resumed from
    again = run(_job(tmp_path, tiny_model_dir, pairs_file, lr=1e-2, options=changed, work="cut"))
    assert again.info["resumed_from"] is None


# -- options and the runner ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"grup_size": 4}, "choose from algorithm, reward, judge_args"),
    ({"algorithm": "ppo"}, "'lite-ppo', 'grpo' or 'rloo'"),
    ({"reward": "toxicty"}, "unknown reward 'toxicty'; choose from mcq, toxicity"),
    ({"group_size": 1}, "group_size must be at least 2"),
    ({"aggregation": "sum"}, "'token' or 'sequence'"),
    ({"judge_args": {"scorer": "profanity"}}, "judge_args belong to a judge reward"),
    ({"reward": "toxicity", "judge_args": {"scorrer": "x"}}, "choose from scorer"),
])
def test_options_errors_list_the_valid_choices(options, message):
    with pytest.raises(ConfigError, match=message):
        METHOD_KINDS.get("rl").make_options(options)


def test_a_spec_with_a_bad_rl_option_fails_at_load(tmp_path, tiny_model_dir):
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    spec = tiny_spec(tiny_model_dir)
    spec["methods"]["rl"] = {"kind": "rl", "options": {"steps": 2, "clip_range": 0.2}}
    with pytest.raises(ConfigError, match="clip_range.*choose from algorithm"):
        load_spec(write_spec(tmp_path, spec))


def test_the_documented_gpu_configuration_is_a_valid_spec(tmp_path):
    import textwrap

    import yaml

    from dpolab.experiment.spec import load_spec
    from dpolab.methods import rl
    from tests.test_run import write_spec

    doc = rl.__doc__
    spec = load_spec(write_spec(tmp_path, yaml.safe_load(textwrap.dedent(doc[doc.index("    contexts:"):]))))
    assert spec.methods["grpo-detox"].kind_options().kl_coef == 0.04
    assert ("detox", "lite-ppo-mcq", 0) in spec.cells()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))


def test_an_rl_cell_runs_end_to_end(tmp_path, tiny_model_dir, pairs_file, home):
    """kind: rl with the MCQ reward beside DPO on a user's pairs: the cell trains, is evaluated, records its RL
    info in cell.json and appears in results.parquet."""
    from dpolab.experiment import runner
    from dpolab.experiment.results import read_results
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    spec = tiny_spec(tiny_model_dir, contexts={"user-data": {"methods": ["dpo", "rl"],
                                                             "options": {"path": str(pairs_file)}}})
    spec["methods"] = {"dpo": {"loss": "dpo"}, "rl": {"kind": "rl", "train": {"lr": 1e-3}, "options": {
        "reward": "mcq", "steps": 2, "prompts_per_step": 2, "group_size": 2, "epochs_per_batch": 1,
        "max_new_tokens": 4, "n_prompts": 4}}}
    spec["probes"] = {"names": ["knowledge"], "sizes": {"knowledge": {"n_items": 4, "n_chunks": 2}}}
    spec["train"]["threads"] = 1
    out = tmp_path / "run"
    runner.run_experiment(load_spec(write_spec(tmp_path, spec)), out, progress=False)

    cell = json.loads((out / "cells" / "user-data__rl__s0" / "cell.json").read_text())
    assert cell["train_steps"] == 2 and cell["rl"]["steps"] == 2 and cell["rl"]["reward_task"] == "mcq (letter)"
    assert cell["rl"]["lr"] == 1e-3 and cell["rl"]["prompts_source"] == "knowledge bank, train split"
    assert (out / "cells" / "user-data__rl__s0" / "eval" / "summary.json").exists()
    assert {(r.context, r.method) for r in read_results(out / "results.parquet")} >= {("user-data", "rl"),
                                                                                      ("user-data", "dpo")}
