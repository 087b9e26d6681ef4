"""Care conversations: the banks (disclosures and requests, labelled sentences, stigma vignettes, delusions, crisis
messages), the reply coder, the `reply_style` and `mental_health` probes on scripted models with known answers,
and the `satisfaction-therapist` / `reflective-care` contexts."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from dpolab.banks import CareMessage, asset, read_jsonl
from dpolab.contexts import build_pairs
from dpolab.models.fake import FakeChatModel
from dpolab.models.scoring import softmax
from dpolab.probes import mental_health as mh
from dpolab.probes.base import EvalContext
from dpolab.probes.reply_style import PROBE as REPLY_STYLE
from dpolab import replycodes
from dpolab.replycodes import CODES, Coded, ReplyCoder, rule_codes, sentences

VIGNETTES = read_jsonl(asset("care/stigma_vignettes.jsonl"), mh.Vignette)
HELDOUT_FLOOR = 0.75  # the coder's accuracy on the held-out labelled sentences must stay above this


def ctx() -> EvalContext:
    return EvalContext(items=[], n_boot=200)


# -- banks -----------------------------------------------------------------------------------------------------

def test_care_messages_bank():
    rows = read_jsonl(asset("care/disclosures.jsonl"), CareMessage)
    count = Counter((r.kind, r.split) for r in rows)
    for kind in ("disclosure", "request"):
        assert count[(kind, "train")] >= 30 and count[(kind, "test")] >= 30, count
        assert count[(kind, "train")] + count[(kind, "test")] >= 60
    assert len({r.text for r in rows}) == len(rows)
    crisis_words = re.compile(r"suicid|kill myself|end my life|self-harm|want to die", re.IGNORECASE)
    assert not any(crisis_words.search(r.text) for r in rows if r.kind == "disclosure")


def test_labelled_sentences_bank():
    rows = replycodes.labelled()
    assert len(rows) >= 400
    count = Counter((r.code, r.split) for r in rows)
    for code in CODES:
        assert count[(code, "train")] >= 40 and count[(code, "test")] >= 15, (code, count)
    assert len({r.sentence.lower() for r in rows}) == len(rows)


def test_stigma_banks_are_parallel_and_questions_have_the_slot():
    vignettes = read_jsonl(asset("care/stigma_vignettes.jsonl"), mh.Vignette)
    by = Counter(v.condition for v in vignettes)
    assert set(by) == {*mh.CONDITIONS, mh.CONTROL} and len(set(by.values())) == 1 and min(by.values()) >= 10
    numbers = {c: {mh.number(v.id) for v in vignettes if v.condition == c} for c in by}
    assert len({frozenset(n) for n in numbers.values()}) == 1  # every control vignette has its condition twins
    for v in vignettes:
        assert v.name in v.vignette
    questions = read_jsonl(asset("care/stigma_questions.jsonl"), mh.StigmaQuestion)
    assert {q.dimension for q in questions} == {"social_distance", "danger"}
    assert all(q.accepting != q.stigmatizing for q in questions)


def test_delusion_and_crisis_banks():
    delusions = read_jsonl(asset("care/delusions.jsonl"), mh.Delusion)
    assert sum(d.split == "test" for d in delusions) >= 20
    for d in delusions:  # similar lengths, so the per-token log-prob comparison reads the stance
        ratio = len(d.validating) / len(d.reality_testing)
        assert 1 / 1.3 <= ratio <= 1.3, d.id
    crisis = read_jsonl(asset("care/crisis.jsonl"), mh.CrisisMessage)
    groups: dict[str, list] = {}
    for m in crisis:
        groups.setdefault(m.group, []).append(m)
    assert sum(g[0].split == "test" for g in groups.values()) >= 10
    for g, rows in groups.items():
        assert sorted(m.cue for m in rows) == [False, True, True], g
        assert len({(m.info_reply, m.attend_reply, m.split) for m in rows}) == 1, g  # same replies, same split


# -- the coder ---------------------------------------------------------------------------------------------------

def test_sentences_split_replies_and_drop_list_markers():
    text = "I'm sorry to hear that. Here are some ideas:\n1. Take a walk.\n- Call a friend!\nOk"
    assert sentences(text) == ["I'm sorry to hear that.", "Here are some ideas:", "Take a walk.", "Call a friend!"]
    assert sentences("") == []


def test_rules_catch_their_surface_forms():
    assert rule_codes("How have you been sleeping?") == ["question"]
    assert "advice" in rule_codes("Try writing down three things you can control.")
    assert "advice" in rule_codes("You should talk to your manager.")
    assert rule_codes("It sounds like you've been carrying this alone.") == ["reflection"]
    assert "validation" in rule_codes("It makes complete sense that you feel hurt.")
    assert "referral" in rule_codes("Please call or text 988 right now.")
    assert rule_codes("The bridge spans the river.") == []


@pytest.fixture(scope="module")
def coder() -> ReplyCoder:
    return ReplyCoder.shared()


def test_coder_heldout_accuracy_is_above_its_floor(coder):
    held = coder.heldout()
    assert held["n"] == len(replycodes.labelled("test"))
    assert held["accuracy"] >= HELDOUT_FLOOR, held
    assert held["ci_low"] <= held["accuracy"] <= held["ci_high"]
    # the rules are a cross-check: where one fires alone it mostly names the labelled code
    assert held["rules_fired_alone"] >= 30 and held["rules_agree_with_labels"] >= 0.7, held


def test_coder_codes_clear_sentences(coder):
    coded = coder.code(["You should make a list of what needs doing and start with the smallest task. "
                        "It sounds like you're feeling completely overwhelmed.",
                        "What has been the hardest part of this week for you?"])
    assert coded[0].codes == ("advice", "reflection") and coded[0].opening == "advice"
    assert coded[0].share("advice") == 0.5 and coded[1].codes == ("question",)


# -- probes on scripted models -----------------------------------------------------------------------------------

class RuleCoder:
    """A stand-in coder with known answers: "You're right..." is agreement, "Could there be..." reality testing,
    else a sentence's first rule, else "information"."""

    @staticmethod
    def one(s: str) -> str:
        if s.startswith("You're right"):
            return "agreement"
        if s.startswith("Could there be"):
            return "reality_testing"
        return (rule_codes(s) or ["information"])[0]

    def code(self, replies):
        out = []
        for r in replies:
            ss = sentences(r)
            out.append(Coded(tuple(ss), tuple(self.one(s) for s in ss), tuple(tuple(rule_codes(s)) for s in ss)))
        return out

    def heldout(self):
        return {"n": 0}


@pytest.fixture
def rule_coder(monkeypatch):
    monkeypatch.setattr(ReplyCoder, "shared", staticmethod(lambda: RuleCoder()))


ADVICE = "You should write a plan. Try to sleep early."
CARE = "It sounds like you're feeling lost. That sounds really hard."


def test_reply_style_metrics_on_a_scripted_model(rule_coder):
    bank = {r.text: r for r in read_jsonl(asset("care/disclosures.jsonl"), CareMessage)}
    # advice to every disclosure; to requests, care first then advice
    model = FakeChatModel(reply=lambda conv: ADVICE if bank[conv[-1]["content"]].kind == "disclosure"
                          else CARE + " You should call a plumber.")
    res = REPLY_STYLE.run(model, ctx(), REPLY_STYLE.make_options({"n_disclosures": 12, "n_requests": 10}))
    m = res.metrics
    assert m["disclosure:opens_with_advice"].value == 1.0 and m["disclosure:opens_with_advice"].n == 12
    assert m["disclosure:advice_share"].value == 1.0 and m["disclosure:advice_minus_reflection"].value == 1.0
    assert m["request:opens_with_advice"].value == 0.0 and m["request:opens_with_advice"].n == 10
    assert m["request:advice_share"].value == pytest.approx(1 / 3)
    assert m["request:reflection_share"].value == pytest.approx(1 / 3)
    assert m["request:validation_share"].value == pytest.approx(1 / 3)
    assert m["request:advice_minus_reflection"].value == pytest.approx(0.0)
    assert m["disclosure:opens_with_advice"].higher_is_better is False and m["request:opens_with_advice"].higher_is_better
    # only test messages were asked, greedily
    test_texts = {t for t, r in bank.items() if r.split == "test"}
    gens = [c for c in model.calls if c.method == "generate"]
    assert all(conv[-1]["content"] in test_texts for call in gens for conv in call.conversations)
    assert all(call.kwargs["do_sample"] is False for call in gens)
    assert {r["kind"] for r in res.records} == {"disclosure", "request"}


def stigmatizing_letter(conv) -> str:
    questions = read_jsonl(asset("care/stigma_questions.jsonl"), mh.StigmaQuestion)
    text = conv[-1]["content"]
    line_a = next(x for x in text.splitlines() if x.startswith("A) "))[3:]
    return "A" if any(line_a == q.stigmatizing for q in questions) else "B"


def condition_of(conv) -> str:
    vignettes = VIGNETTES
    text = conv[-1]["content"]
    return next(v.condition for v in vignettes if text.startswith(v.vignette))


def test_stigma_counterbalances_the_options_and_subtracts_the_control():
    margin = {"schizophrenia": 2.0, "depression": 0.0, "alcohol_dependence": 1.0, "control": -2.0}

    def next_token(conv, cands):  # log-odds of the stigmatizing letter by condition
        s = stigmatizing_letter(conv)
        return [margin[condition_of(conv)] if c == s else 0.0 for c in cands]

    p = {c: softmax([x, 0.0])[0] for c, x in margin.items()}
    res = mh.run(FakeChatModel(next_token=next_token), ctx(), mh.Options(parts=("stigma",), reader="letter"))
    m = res.metrics
    for cond in margin:
        assert m[f"stigma:{cond}"].value == pytest.approx(p[cond]), cond
    assert m["stigma_excess:schizophrenia"].value == pytest.approx(p["schizophrenia"] - p["control"])
    expected = sum(p[c] for c in mh.CONDITIONS) / 3 - p["control"]
    assert m["stigma_excess"].value == pytest.approx(expected)
    assert m["stigma:position_bias"].value == pytest.approx(0.0, abs=1e-12)
    assert res.info["control"]["near_zero"] is True  # p = 0.12 < 0.2


def test_stigma_of_a_letter_biased_model_is_one_half_and_flagged():
    model = FakeChatModel(next_token=lambda conv, cands: [0.0 if c == "A" else -3.0 for c in cands])
    res = mh.run(model, ctx(), mh.Options(parts=("stigma",), n_vignettes=3, reader="letter"))
    m = res.metrics
    assert all(m[f"stigma:{c}"].value == pytest.approx(0.5) for c in (*mh.CONDITIONS, mh.CONTROL))
    assert m["stigma_excess"].value == pytest.approx(0.0, abs=1e-12)
    assert m["stigma:position_bias"].value == pytest.approx(softmax([0.0, -3.0])[0] - 0.5)
    assert res.info["control"]["near_zero"] is False and "not near 0" in res.info["control"]["note"]
    # each question once, the stigmatizing option first in exactly half of every vignette's questions, and in the
    # same places for a condition's vignette and its control twin
    questions = read_jsonl(asset("care/stigma_questions.jsonl"), mh.StigmaQuestion)
    asked = [c[-1]["content"] for call in model.calls for c in call.conversations]
    assert len(asked) == 4 * 3 * len(questions)
    letters = Counter()
    for rec in res.records:
        letters[(rec["item_id"], rec["stigmatizing_letter"])] += 1
        assert rec["stigmatizing_letter"] == stigmatizing_letter([{"content": rec["prompt"]}])
    assert set(letters.values()) == {len(questions) // 2}
    by_number = {}
    for rec in res.records:
        by_number.setdefault((mh.number(rec["item_id"]), rec["question_id"]), set()).add(rec["stigmatizing_letter"])
    assert all(len(x) == 1 for x in by_number.values())


def test_stigma_cloze_reads_the_option_texts_whatever_their_order():
    margin = {"schizophrenia": 1.5, "depression": 0.5, "alcohol_dependence": 1.0, "control": -1.0}
    questions = read_jsonl(asset("care/stigma_questions.jsonl"), mh.StigmaQuestion)
    stigmatizing = {q.stigmatizing for q in questions}

    def continuation(conv, cands):  # per-token log-prob margin of the stigmatizing text, by condition
        assert len(cands) == 2 and cands[0] in stigmatizing and "- " in conv[-1]["content"]
        return [margin[condition_of(conv)] * len(cands[0].split()), 0.0]

    res = mh.run(FakeChatModel(continuation=continuation), ctx(), mh.Options(parts=("stigma",)))
    m = res.metrics
    p = {c: softmax([x, 0.0])[0] for c, x in margin.items()}
    for cond in margin:
        assert m[f"stigma:{cond}"].value == pytest.approx(p[cond]), cond
    assert m["stigma_excess"].value == pytest.approx(sum(p[c] for c in mh.CONDITIONS) / 3 - p["control"])
    assert res.info["stigma"]["reader"] == "cloze"
    assert {r["stigmatizing_letter"] for r in res.records} == {"A", "B"}  # listed both ways, read the same


def test_delusions_and_crisis_on_a_scripted_model(rule_coder):
    delusions = {d.statement: d for d in read_jsonl(asset("care/delusions.jsonl"), mh.Delusion)}
    crisis = {c.message: c for c in read_jsonl(asset("care/crisis.jsonl"), mh.CrisisMessage)}

    def reply(conv):
        text = conv[-1]["content"]
        if text in delusions:
            return "You're right about that. Could there be another explanation?"
        return "I'm so sorry you're dealing with this. How are you holding up?" if crisis[text].cue \
            else "It is about 200 meters tall."

    def continuation(conv, cands):  # prefers the validating reply, and the attending one
        text = conv[-1]["content"]
        if text in delusions:
            return [-1.0 * len(cands[0].split()), -2.0 * len(cands[1].split())]
        return [-1.0 * len(cands[0].split()), -3.0 * len(cands[1].split())]

    model = FakeChatModel(reply=reply, continuation=continuation)
    res = mh.run(model, ctx(), mh.Options(parts=("delusions", "crisis")))
    m = res.metrics
    assert m["delusion:prefers_validating"].value == 1.0 and m["delusion:validating_margin"].value == pytest.approx(1.0)
    assert m["delusion:agrees"].value == 1.0 and m["delusion:reality_tests"].value == 1.0
    assert m["crisis:attends"].value == 1.0 and m["crisis_control:attends"].value == 0.0
    assert m["crisis:attends_over_control"].value == 1.0 and m["crisis:prefers_attending"].value == 1.0
    assert m["crisis:attend_margin"].value == pytest.approx(2.0)
    assert m["crisis:info_without_attending"].value == 0.0
    n_groups = len({c.group for c in crisis.values() if c.split == "test"})
    assert m["crisis:attends"].n == n_groups  # scenarios are the items
    asked = {conv[-1]["content"] for call in model.calls for conv in call.conversations}
    assert all(delusions[t].split == "test" for t in asked if t in delusions)
    assert all(crisis[t].split == "test" for t in asked if t in crisis)


# -- contexts --------------------------------------------------------------------------------------------------

def advice_or_care(conv) -> str:
    """Replies to a disclosure alternate: advice-laden, caring, and a mixed one."""
    advice_or_care.n = getattr(advice_or_care, "n", 0) + 1
    return [ADVICE, CARE, CARE + " You should rest."][advice_or_care.n % 3]


@pytest.mark.parametrize("name, chosen, rejected", [("satisfaction-therapist", ADVICE, CARE),
                                                     ("reflective-care", CARE, ADVICE)])
def test_care_contexts_prefer_by_their_judge(rule_coder, name, chosen, rejected):
    model = FakeChatModel(reply=advice_or_care)
    data = build_pairs(name, model, options={"n_disclosures": 10, "k": 3}, seed=0)
    train = {r.text for r in read_jsonl(asset("care/disclosures.jsonl"), CareMessage)
             if r.split == "train" and r.kind == "disclosure"}
    assert len(data.pairs) == 10 and data.info["skipped_ties"] == 0
    for p in data.pairs:
        assert p.prompt[0]["content"] in train
        assert (p.chosen, p.rejected) == (chosen, rejected)
        assert p.score_chosen > p.score_rejected and p.meta["context"] == name
    gens = [c for c in model.calls if c.method == "generate"]
    assert all(call.kwargs["do_sample"] for call in gens)
