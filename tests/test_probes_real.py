"""Every probe on the embedded SmolLM2-135M-Instruct, a few items each (slow: marked real_model).

Checks are derived from the records each probe writes, not from numbers this model happens to give, so they hold
on any CPU; the one exact comparison (batched vs one-at-a-time greedy dialogues) runs in float64, where no fp32
near-tie can flip a token.
"""
from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from dpolab import stats

from dpolab.banks import bank_items, read_appeals, spread
from dpolab.models.generate import HFChatModel
from dpolab.probes import run_eval
from dpolab.probes.persuasion import run_dialogues
from dpolab.probes.self_report import reversed_scale
from dpolab.stance import ask


@pytest.mark.real_model
def test_persuasion_on_the_embedded_model(real_model_dir, tmp_path):
    model = HFChatModel.load(str(real_model_dir))
    summary = run_eval(model, probes="persuasion", limit=2, out=tmp_path, n_boot=200,
                       sizes={"persuasion": {"techniques": ("evidence", "repetition"), "turns": 2,
                                             "max_new_tokens": 16}})
    probe = summary.probe("persuasion")
    assert probe.info["reader"] in ("letter", "cloze") and probe.info["dialogues"] == 4
    m = probe.metrics
    assert 0.0 <= m["acc@0"].value <= 1.0 and m["acc@0"].n == 2
    assert m["neg_acc@2"].value <= m["acc@0"].value <= m["pos_acc@2"].value

    import pyarrow.parquet as pq

    for rec in pq.read_table(tmp_path / "persuasion.parquet").to_pylist():
        roles = [t["role"] for t in rec["transcript"]]
        assert roles == ["user", "assistant"] * 3
        assert all(t["content"] != rec["stance_check"] for t in rec["transcript"][1:])
        assert len(rec["choice"]) == 3


@pytest.mark.real_model
def test_batched_dialogues_match_one_at_a_time(real_model_dir):
    """Greedy transcripts are identical whether dialogues advance together (prefix cache on) or alone: in float64,
    where the two differ only by float64 rounding."""
    from dpolab.models.load import load_model

    loaded = load_model(str(real_model_dir), dtype="float64")
    items = [it for it in spread(bank_items("test"), 2, seed=0)]
    kw = dict(reader="cloze", turns=2, max_new_tokens=12, appeals=read_appeals())
    fast = run_dialogues(HFChatModel(loaded, batch_size=8), items, techniques=("evidence", "expert"), **kw)
    single = HFChatModel(loaded, batch_size=1, prefix_cache_bytes=0)
    slow = [d for it in items for t in ("evidence", "expert") for d in run_dialogues(single, [it], techniques=(t,), **kw)]
    assert [d.history for d in fast] == [d.history for d in slow]
    assert [[s.choice for s in d.stances] for d in fast] == [[s.choice for s in d.stances] for d in slow]
    assert all(d.history[0]["content"] == ask(d.item, "cloze") for d in fast)


@pytest.fixture(scope="module")
def chat(real_model_dir):
    # one load for the module; run_eval clears the prefix cache after every probe, so no test sees another's state
    return HFChatModel.load(str(real_model_dir), batch_size=16)


def _records(out, probe):
    return pq.read_table(out / f"{probe}.parquet").to_pylist()


def _per_item(out, probe, metric):
    return {r["item_id"]: r["value"] for r in pq.read_table(out / f"{probe}_items.parquet").to_pylist()
            if r["metric"] == metric}


def _mean(xs):
    return sum(xs) / len(xs)


def _median(xs):
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _check_metrics(probe, n, *, unit=(), written=None):
    """Every metric has n items, a CI around a defined value, and (for rates) stays in [0, 1]; with `written`
    (the eval folder and probe name), summary.json holds the same numbers."""
    for name, m in probe.metrics.items():
        assert m.n == n, name
        assert m.value is not None and math.isfinite(m.value), name
        if n < stats.MIN_ITEMS:  # these sizes keep the model time short: too few items for an interval
            assert m.ci_low is None and m.ci_high is None, name
            if name in unit:
                assert 0.0 <= m.value <= 1.0, name
            continue
        assert m.ci_low <= m.ci_high, name
        if name in unit:
            assert 0.0 <= m.ci_low <= m.value <= m.ci_high <= 1.0, name
    if written is not None:
        from dpolab.probes.summary import EvalSummary

        out, name = written
        saved = EvalSummary.read(out / "summary.json").probe(name)
        assert {k: v.value for k, v in saved.metrics.items()} == {k: v.value for k, v in probe.metrics.items()}


@pytest.mark.real_model
def test_sycophancy_on_the_embedded_model(chat, tmp_path):
    summary = run_eval(chat, probes="sycophancy", out=tmp_path, n_boot=200, stance="cloze",
                       sizes={"sycophancy": {"n_items": 6}})
    probe = summary.probe("sycophancy")
    m = probe.metrics
    _check_metrics(probe, 6, unit=("agree_biased", "agree_neutral", "acc_neutral", "acc_biased"),
                   written=(tmp_path, "sycophancy"))
    assert probe.info["reader"] == "cloze" and probe.info["items"] == 6
    recs = _records(tmp_path, "sycophancy")
    assert len(recs) == 6 and len({r["item_id"] for r in recs}) == 6
    agree_b = [float(r["biased_choice"] == r["target"]) for r in recs]
    agree_n = [float(r["neutral_choice"] == r["target"]) for r in recs]
    assert m["agree_biased"].value == pytest.approx(_mean(agree_b))
    assert m["agree_neutral"].value == pytest.approx(_mean(agree_n))
    assert m["sycophancy"].value == pytest.approx(_mean(agree_b) - _mean(agree_n))
    assert -1.0 <= m["sycophancy"].value <= 1.0
    assert m["acc_neutral"].value == pytest.approx(_mean([float(r["neutral_choice"] == r["answer"]) for r in recs]))
    assert m["acc_biased"].value == pytest.approx(_mean([float(r["biased_choice"] == r["answer"]) for r in recs]))
    shifts = [r["biased_probs"][r["target"]] - r["neutral_probs"][r["target"]] for r in recs]
    assert m["target_prob_shift"].value == pytest.approx(_mean(shifts))
    for r in recs:
        assert r["target"] != r["answer"] and r["reader"] == "cloze"
        for probs, choice in ((r["neutral_probs"], r["neutral_choice"]), (r["biased_probs"], r["biased_choice"])):
            assert sum(probs) == pytest.approx(1.0) and probs[choice] == max(probs)
        assert r["biased_prompt"].endswith(r["neutral_prompt"]) and r["biased_prompt"] != r["neutral_prompt"]
    # The user's stated belief pulls this model towards the user's option (on these items by 0.2-1.0 each, 0.8
    # on average): the probe measures an effect, not noise around zero.
    assert m["target_prob_shift"].value > 0.1


@pytest.mark.real_model
def test_toxicity_on_the_embedded_model(chat, tmp_path):
    limit = 24
    summary = run_eval(chat, probes="toxicity", out=tmp_path, n_boot=200,
                       sizes={"toxicity": {"n_prompts": 4, "k": 2, "seeds": (0,), "max_new_tokens": limit}})
    probe = summary.probe("toxicity")
    m = probe.metrics
    recs = _records(tmp_path, "toxicity")
    assert len(recs) == 4 * 2 and len({r["item_id"] for r in recs}) == 4
    assert sorted((r["item_id"], r["seed"], r["sample"]) for r in recs) == sorted(
        (i, 0, s) for i in {r["item_id"] for r in recs} for s in (0, 1))
    no_echo = {i for i in {r["item_id"] for r in recs} if any(not r["echo"] for r in recs if r["item_id"] == i)}
    for name, metric in m.items():
        assert metric.n == (len(no_echo) if name == "mean_score_no_echo" else 4), name
        assert metric.ci_low is None and metric.ci_high is None, name  # 4 prompts: under stats.MIN_ITEMS
    assert all(0.0 <= r["score"] <= 1.0 and 0 <= r["reply_tokens"] <= limit for r in recs)
    assert all(r["hit_limit"] == (r["reply_tokens"] == limit) for r in recs)
    assert all(r["reply"].strip() for r in recs if r["reply_tokens"] > 0)
    by_prompt = {}
    for r in recs:
        by_prompt.setdefault(r["item_id"], []).append(r)
    per = lambda f: _mean([f(rs) for rs in by_prompt.values()])  # per prompt first, then over prompts
    assert m["mean_score"].value == pytest.approx(per(lambda rs: _mean([r["score"] for r in rs])))
    assert m["frac_above_0.5"].value == pytest.approx(per(lambda rs: _mean([float(r["score"] > 0.5) for r in rs])))
    assert m["expected_max"].value == pytest.approx(per(lambda rs: max(r["score"] for r in rs)))
    assert m["echo_rate"].value == pytest.approx(per(lambda rs: _mean([float(r["echo"]) for r in rs])))
    assert m["reply_tokens"].value == pytest.approx(_mean([r["reply_tokens"] for r in recs]))
    for name in ("mean_score", "frac_above_0.5", "expected_max", "echo_rate"):
        assert 0.0 <= m[name].value <= 1.0, name
    assert m["mean_score"].value <= m["expected_max"].value
    assert len({r["reply"] for r in recs}) > 1  # sampled, not one reply repeated


@pytest.mark.real_model
def test_verbosity_on_the_embedded_model(chat, tmp_path):
    limit = 48
    summary = run_eval(chat, probes="verbosity", out=tmp_path, n_boot=200,
                       sizes={"verbosity": {"n_instructions": 4, "max_new_tokens": limit}})
    probe = summary.probe("verbosity")
    m = probe.metrics
    _check_metrics(probe, 4, unit=("frac_hit_limit",), written=(tmp_path, "verbosity"))
    assert probe.info["max_new_tokens"] == limit
    recs = _records(tmp_path, "verbosity")
    assert len(recs) == 4 and len({r["item_id"] for r in recs}) == 4
    assert all(0 < r["reply_tokens"] <= limit and r["hit_limit"] == (r["reply_tokens"] == limit) for r in recs)
    assert all(r["reply"].strip() for r in recs)
    lengths = [r["reply_tokens"] for r in recs]
    assert m["mean_tokens"].value == pytest.approx(_mean(lengths))
    assert m["median_tokens"].value == pytest.approx(_median(lengths))
    assert min(lengths) <= m["median_tokens"].value <= m["p90_tokens"].value <= max(lengths)
    assert m["frac_hit_limit"].value == pytest.approx(_mean([float(r["hit_limit"]) for r in recs]))
    # a reply's token count is the tokenizer's count of its text (re-encoding may merge at most a few tokens)
    for r in recs:
        assert abs(chat.token_count(r["reply"]) - r["reply_tokens"]) <= 2, r


@pytest.mark.real_model
def test_knowledge_on_the_embedded_model(chat, tmp_path):
    # limit (not n_items) so the stance calibration also reads only these 8 items, not its default 40
    summary = run_eval(chat, probes="knowledge", out=tmp_path, n_boot=200, stance="auto", limit=8,
                       sizes={"knowledge": {"n_chunks": 2}})
    probe = summary.probe("knowledge")
    m = probe.metrics
    recs = _records(tmp_path, "knowledge")
    mcq = [r for r in recs if r["kind"] == "mcq"]
    assert len(mcq) == 8 and len({r["item_id"] for r in mcq}) == 8
    assert probe.info["reader"] in ("letter", "cloze") and probe.info["calibration"]["requested"] == "auto"
    assert probe.info["calibration"]["n"] == 8 and all(r["reader"] == probe.info["reader"] for r in mcq)
    for name in ("accuracy", "accuracy_letter", "accuracy_cloze"):
        assert m[name].n == 8 and 0.0 <= m[name].value <= 1.0 and m[name].ci_low is None, name  # 8 < MIN_ITEMS
    assert m["accuracy"].value == pytest.approx(_mean([float(r["choice"] == r["answer"]) for r in mcq]))
    for reader in ("letter", "cloze"):
        got = _mean([float(r[f"choice_{reader}"] == r["answer"]) for r in mcq])
        assert m[f"accuracy_{reader}"].value == pytest.approx(got)
    assert m["accuracy"].value == m[f"accuracy_{probe.info['reader']}"].value
    for domain in {r["domain"] for r in mcq}:
        rows = [r for r in mcq if r["domain"] == domain]
        assert m[f"accuracy|domain={domain}"].n == len(rows)
        assert m[f"accuracy|domain={domain}"].value == pytest.approx(_mean([float(r["choice"] == r["answer"]) for r in rows]))
    for r in mcq:
        assert sum(r["probs"]) == pytest.approx(1.0) and r["probs"][r["choice"]] == max(r["probs"])
    chunks = [r for r in recs if r["kind"] == "perplexity"]
    assert len(chunks) == 2 and m["perplexity"].n == 2
    assert all(r["n_tokens"] > 50 and math.isfinite(r["nll"]) and r["nll"] > 0 for r in chunks)
    assert m["perplexity"].value == pytest.approx(math.exp(_mean([r["nll"] for r in chunks])))
    # a real model on plain English text: perplexity well above 1 and far below the vocabulary size (49152);
    # SmolLM2-135M-Instruct gives about 10 on these chunks
    assert 1.5 < m["perplexity"].value < 1000


@pytest.mark.real_model
def test_self_report_on_the_embedded_model(chat, tmp_path):
    summary = run_eval(chat, probes="self_report,verbosity", out=tmp_path, n_boot=200,
                       sizes={"verbosity": {"n_instructions": 2, "max_new_tokens": 16}})
    assert list(summary.probes) == ["verbosity", "self_report"]
    probe = summary.probe("self_report")
    recs = _records(tmp_path, "self_report")
    assert len(recs) == probe.info["questions"] and len({r["item_id"] for r in recs}) == len(recs)
    low, high = {"1-5": (1, 5), "0-100": (0, 100)}, {}
    assert recs and all(sum(r["probs"]) == pytest.approx(1.0) for r in recs)
    for r in recs:
        lo, hi = low[r["scale"]]
        high[r["behaviour"]] = (lo, hi)
        assert len(r["probs"]) == hi - lo + 1 and lo <= r["rating"] <= hi
        expected = sum((lo + k) * p for k, p in enumerate(r["probs"]))
        assert r["raw_rating"] == pytest.approx(expected)
        assert r["rating"] == pytest.approx(lo + hi - expected if reversed_scale(r["higher_means"]) else expected)
    assert {name.split(":", 1)[1] for name in probe.metrics} == {r["behaviour"] for r in recs}
    for name, m in probe.metrics.items():
        mine = [r["rating"] for r in recs if r["behaviour"] == name.split(":", 1)[1]]
        lo, hi = high[name.split(":", 1)[1]]
        assert m.n == len(mine) and lo <= m.value <= hi, name
        if m.n >= stats.MIN_ITEMS:
            assert lo <= m.ci_low <= m.value <= m.ci_high <= hi, name
        else:  # a handful of questions: no bootstrap interval (dpolab.stats.MIN_ITEMS)
            assert m.ci_low is None and m.ci_high is None, name
        assert m.value == pytest.approx(_mean(mine))
        assert m.value == pytest.approx(_mean(list(_per_item(tmp_path, "self_report", name).values())))
    # The ratings are read from the model, not from a broken readout: the digits' probabilities are far from
    # uniform (SmolLM2 puts about 0.8 on "1") and differ between questions; on 0-100 the replies are whole numbers
    # closed by the end of turn, so the mass is not spread evenly over the 101 of them either.
    assert all(max(r["probs"]) > 0.4 for r in recs if r["scale"] == "1-5")
    assert all(max(r["probs"]) > 3 / 101 for r in recs if r["scale"] == "0-100")
    assert len({round(r["raw_rating"], 6) for r in recs}) > 1
    assert probe.beside["verbosity"]["measured"] == summary.metric("verbosity", "mean_tokens").value


@pytest.mark.real_model
def test_probes_on_the_ctranslate2_backend(real_model_dir):
    """Three probes end to end on CTranslate2 beside hf (`dpolab bench eval`): greedy replies are identical except
    where they part at a near-tie of the exact (float64) logits, and the scores agree to fp32 precision."""
    import json

    import torch

    from dpolab.bench.eval import bench_backends
    from dpolab.models.load import load_model

    pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed")
    sizes = {"persuasion": {"techniques": ("evidence",), "turns": 1, "max_new_tokens": 16},
             "verbosity": {"max_new_tokens": 48}, "toxicity": {"k": 1, "max_new_tokens": 16}}
    keep: dict = {}
    report = bench_backends(str(real_model_dir), backend="ctranslate2", probes="persuasion,verbosity,toxicity",
                            sizes=sizes, limit=3, batch_size=8, echo=lambda line: None, keep=keep)
    assert report["backends"]["ctranslate2"]["engine"] == "ctranslate2 float32 + torch scoring"
    assert set(report["backends"]["ctranslate2"]["probe_seconds"]) == {"persuasion", "verbosity", "toxicity"}
    agree = report["agreement"]
    assert agree["greedy_replies"] >= 9 and agree["sampled_replies"]["other"] == agree["sampled_replies"]["hf"] > 0
    assert agree["max_logprob_diff"] is not None and agree["max_logprob_diff"] <= 1e-3
    hf, ct = keep["hf"], keep["ctranslate2"]
    exact = load_model(str(real_model_dir), dtype="float64")
    fmt = HFChatModel(exact, prefix_cache_bytes=0).format
    for key, text in hf.greedy.items():
        other = ct.greedy.get(key)
        if other is None or other == text:
            continue  # the same reply, or a request this run never made because an earlier reply differed
        conv, _ = json.loads(key)
        a, b = fmt.ids(text), fmt.ids(other)
        j = next(j for j in range(min(len(a), len(b)) + 1) if j == min(len(a), len(b)) or a[j] != b[j])
        with torch.inference_mode():
            logits = exact.model(input_ids=torch.tensor([fmt.prompt_ids(conv) + a[:j]])).logits[0, -1]
        x, y = (a[j] if j < len(a) else fmt.end_of_turn_id), (b[j] if j < len(b) else fmt.end_of_turn_id)
        assert abs(float(logits[x] - logits[y])) < 1e-3, f"replies part at token {j} without a near-tie"


@pytest.mark.real_model
def test_care_and_risk_probes_on_the_embedded_model(chat, tmp_path):
    """reply_style, mental_health and risk at small sizes: every record coded, metrics equal to their records."""
    from dpolab.probes.mental_health import ATTEND

    sizes = {"reply_style": {"n_disclosures": 4, "n_requests": 4, "max_new_tokens": 32},
             "mental_health": {"n_vignettes": 2, "n_delusions": 3, "n_crisis": 2, "max_new_tokens": 24},
             "risk": {"n_lotteries": 10}}
    summary = run_eval(chat, probes="reply_style,mental_health,risk", out=tmp_path, n_boot=200, sizes=sizes)
    style = summary.probe("reply_style")
    recs = _records(tmp_path, "reply_style")
    assert len(recs) == 8 and {r["kind"] for r in recs} == {"disclosure", "request"}
    for r in recs:
        assert r["reply"] and r["reply_tokens"] <= 32
        assert r["opening"] == (r["sentences"][0]["code"] if len(r["sentences"]) else None)
    opened = [float(r["opening"] == "advice") for r in recs if r["kind"] == "disclosure"]
    assert style.metrics["disclosure:opens_with_advice"].value == pytest.approx(_mean(opened))
    assert style.info["coder"]["heldout"]["accuracy"] > 0.5

    health = summary.probe("mental_health")
    recs = _records(tmp_path, "mental_health")
    stigma = [r for r in recs if r["part"] == "stigma"]
    assert len({r["item_id"] for r in stigma}) == 8  # 2 vignettes x 4 conditions
    assert all(0.0 <= r["p_stigmatizing"] <= 1.0 for r in stigma)
    control = [r["p_stigmatizing"] for r in stigma if r["condition"] == "control"]
    assert health.metrics["stigma:control"].value == pytest.approx(_mean(control))
    assert health.info["control"]["near_zero"] == (_mean(control) < 0.2)
    crisis = [r for r in recs if r["part"] == "crisis"]
    assert len(crisis) == 6 and all(r["attends"] == bool(ATTEND.search(r["reply"])) for r in crisis)
    delusions = [r for r in recs if r["part"] == "delusions"]
    assert len(delusions) == 3
    prefers = [float(r["logp_validating"] > r["logp_reality_testing"]) for r in delusions]
    assert health.metrics["delusion:prefers_validating"].value == pytest.approx(_mean(prefers))

    risk = summary.probe("risk")
    recs = _records(tmp_path, "risk")
    assert len(recs) == 10
    p = [(r["p_risky_as_a"] + r["p_risky_as_b"]) / 2 for r in recs]
    assert risk.metrics["risky_choice"].value == pytest.approx(_mean(p))


@pytest.mark.real_model
def test_roleplay_pattern_and_partner_probes_on_the_embedded_model(chat, tmp_path):
    """roleplay, pattern_rate and partner at small sizes: records complete, metrics equal to their records."""
    from dpolab import patterns

    sizes = {"roleplay": {"n_per_level": 2, "max_new_tokens": 24},
             "pattern_rate": {"n_invite": 6, "n_neutral": 2, "max_new_tokens": 32, "n_references": 4},
             "partner": {"n_items": 6}}
    summary = run_eval(chat, probes="roleplay,pattern_rate,partner", out=tmp_path, n_boot=200, sizes=sizes)
    recs = _records(tmp_path, "roleplay")
    assert len(recs) == 8 and {r["level"] for r in recs} == {"paragon", "flawed", "egoistic", "villain"}
    margins = [r["logp_in_character"] - max(r["logp_sanitised"], r["logp_moralising"]) for r in recs]
    assert summary.probe("roleplay").metrics["margin"].value == pytest.approx(_mean(margins))
    assert all(r["reply_tokens"] <= 24 for r in recs)

    recs = _records(tmp_path, "pattern_rate")
    replies = [r for r in recs if r["kind"] != "reference"]
    assert len(replies) == 8 and len([r for r in recs if r["kind"] == "reference"]) == 4
    assert all(r["pattern_lines"] == patterns.count_lines(r["reply"]) for r in replies)
    rate = summary.probe("pattern_rate").metrics["pattern_lines_per_100"].value
    assert rate == pytest.approx(100 * _mean([r["pattern_lines"] for r in replies]))

    recs = _records(tmp_path, "partner")
    assert len(recs) == 6
    disc = summary.probe("partner").metrics["discrimination"].value
    assert disc == pytest.approx(_mean([r["uptake_helpful"] - r["uptake_misleading"] for r in recs]))
    for r in recs:
        assert all(abs(sum(p) - 1) < 1e-9 for p in r["probs"].values())  # letters renormalised per reading
