"""Risk taking and the model's report of it: the lotteries, the `risk` probe, the `risky-choices` context, and the
self-report's 0-100 risk questions, on scripted models with known answers."""
from __future__ import annotations

import math

import pytest

from dpolab.banks import SelfReportQuestion, asset, lotteries, read_jsonl
from dpolab.contexts import build_pairs
from dpolab.models.fake import FakeChatModel
from dpolab.models.scoring import softmax
from dpolab.probes.base import EvalContext
from dpolab.probes.risk import PROBE as RISK
from dpolab.probes.self_report import HUNDRED, read_ratings, run as self_report_run, Options as SelfOptions


def gamble_letter(conv) -> str:
    """Which letter the gamble has in a lottery prompt."""
    for line in conv[-1]["content"].splitlines():
        if "chance of" in line:
            return "A" if line.lstrip().startswith(("A)", "A:", "Option A")) else "B"
    raise AssertionError("not a lottery prompt")


def prefers_gamble(margin: float):
    def fn(conv, candidates):
        return [0.0 if c == gamble_letter(conv) else -margin for c in candidates]
    return fn


def ctx(**kw) -> EvalContext:
    return EvalContext(items=[], n_boot=200, **kw)


def test_lotteries_are_seeded_disjoint_by_split_and_near_even_odds():
    train, test = lotteries(200, split="train"), lotteries(200, split="test")
    assert train == lotteries(200, split="train") and train != lotteries(200, split="train", seed=1)
    assert not {lt.id for lt in train} & {lt.id for lt in test}
    for lot in train + test:
        assert 10 <= lot.sure <= 500 and lot.prize > lot.sure and 10 <= lot.chance <= 90
        assert 0.7 < lot.ev_ratio < 1.4, lot
        a, b = lot.text("A"), lot.text("B")
        assert gamble_letter([{"content": a}]) == "A" and gamble_letter([{"content": b}]) == "B"
        assert a.endswith("Answer with A or B.")
    with pytest.raises(ValueError, match="split"):
        lotteries(3, split="dev")


def test_risk_probe_reads_the_gamble_in_both_orders():
    margin = 2.0
    p = softmax([0.0, -margin])[0]
    model = FakeChatModel(next_token=prefers_gamble(margin))
    res = RISK.run(model, ctx(), RISK.make_options({"n_lotteries": 20}))
    m = res.metrics
    assert m["risky_choice"].value == pytest.approx(p) and m["risky_choice"].n == 20
    assert m["risky_choice_rate"].value == 1.0 and m["position_bias"].value == pytest.approx(0.0, abs=1e-12)
    # each lottery asked twice, the gamble once as A and once as B, from the test stream only
    asked = [c[-1]["content"] for call in model.calls for c in call.conversations]
    test = lotteries(20, split="test")
    assert asked == [lot.text(letter) for lot in test for letter in ("A", "B")]
    # ev_choice: p(gamble) where the gamble is worth more, 1 - p(gamble) where it is worth less
    worth = [lot for lot in test if lot.ev_ratio != 1.0]
    expected = sum(p if lot.ev_ratio > 1 else 1 - p for lot in worth) / len(worth)
    assert m["ev_choice"].value == pytest.approx(expected) and m["ev_choice"].n == len(worth)


def test_a_model_that_always_answers_a_is_not_risk_seeking():
    model = FakeChatModel(next_token=lambda conv, cands: [0.0 if c == "A" else -5.0 for c in cands])
    m = RISK.run(model, ctx(), RISK.make_options({"n_lotteries": 12})).metrics
    assert m["risky_choice"].value == pytest.approx(0.5)
    assert m["risky_choice_rate"].value == pytest.approx(0.5)
    assert m["position_bias"].value == pytest.approx(softmax([0.0, -5.0])[0] - 0.5)


def test_risky_choices_context_prefers_the_gamble_only_by_its_letter():
    data = build_pairs("risky-choices", None, options={"n_lotteries": 40}, seed=2)
    train = {lot.id: lot for lot in lotteries(40, split="train", seed=2)}
    assert len(data.pairs) == 40 and data.info["pairs"] == 40
    shown_a = 0
    for p in data.pairs:
        lot = train[p.meta["item_id"]]
        risky = p.meta["risky_letter"]
        assert p.prompt == [{"role": "user", "content": lot.text(risky)}]
        assert gamble_letter(p.prompt) == risky
        safe = "B" if risky == "A" else "A"
        # the same phrasing, only the letter differs, and nothing names risk
        assert p.chosen.replace(risky, "?") == p.rejected.replace(safe, "?")
        assert not any(w in p.chosen.lower() for w in ("risk", "gamble", "chance", "safe"))
        shown_a += risky == "A"
    assert 10 <= shown_a <= 30 and data.info["gamble_shown_as_a"] == shown_a  # the coin, not always A


def test_self_report_risk_questions_read_a_0_to_100_expected_value():
    questions = [q for q in read_jsonl(asset("self_report.jsonl"), SelfReportQuestion) if q.scale == "0-100"]
    assert len(questions) >= 10 and {q.behaviour for q in questions} == {"risk_seeking"}

    def peaked(conv, cands):  # log p(reply) peaked at "70", and a wide shoulder at "20"
        return [-(int(c) - 70) ** 2 / 50 + (2.0 if c == "20" else 0.0) for c in cands]

    model = FakeChatModel(continuation=peaked)
    values, logps = read_ratings(model, questions[:1], [questions[0].question])[0]
    assert values == list(HUNDRED) and len(logps) == 101
    expected = sum(v * p for v, p in zip(HUNDRED, softmax([peaked(None, [str(v)])[0] for v in HUNDRED])))
    res = self_report_run(model, ctx(), SelfOptions())
    assert res.metrics["rating:risk_seeking"].value == pytest.approx(expected)
    assert 60 < expected < 71
    calls = [c for c in model.calls if c.method == "score_continuations"]
    assert calls and calls[0].kwargs["continuations"][0] == [str(v) for v in HUNDRED]  # no end-of-turn text: a fake
    # the 1-5 questions are still read from the next token
    assert res.metrics["rating:yielding"].n == 5 and math.isfinite(res.metrics["rating:yielding"].value)


def test_the_0_to_100_replies_end_with_the_end_of_turn_token(tiny_model_dir):
    from dpolab.models.generate import HFChatModel
    from dpolab.models.load import load_model
    from dpolab.probes.self_report import end_of_turn

    model = HFChatModel(load_model(str(tiny_model_dir)))
    eot = end_of_turn(model)
    assert eot == "<|im_end|>"
    q = SelfReportQuestion(id="q", behaviour="risk_seeking", question="How risky? 0 to 100.", higher_means="more",
                           scale="0-100")
    values, logps = read_ratings(model, [q], [q.question])[0]
    # "5" closed by the end of turn is a different reply from "50": the two are not nested
    assert len(set(logps)) > 90 and all(math.isfinite(x) for x in logps)
    assert model.format.ids("5" + eot)[-1] == model.format.end_of_turn_id
