"""Suppressing a named pattern: the prompt and reference banks, the default pattern and user patterns, removal of
exactly the pattern's sentences, the `suppress-pattern` context and the `pattern_rate` probe on scripted models."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from dpolab import patterns
from dpolab.contexts.suppress_pattern import CONTEXT
from dpolab.errors import ConfigError
from dpolab.models.fake import FakeChatModel
from dpolab.patterns import read_prompts, read_references, remove_matching, segments
from dpolab.probes.base import EvalContext
from dpolab.probes.pattern_rate import PROBE

# -- banks -------------------------------------------------------------------------------------------------------


def test_prompt_bank_schema_and_split():
    rows = read_prompts(None, "train") + read_prompts(None, "test")
    count = Counter(r.split for r in rows)
    assert count["train"] >= 80 and count["test"] >= 60, count
    assert all(re.fullmatch(r"pt-\d{3}", r.id) for r in rows)
    assert len({r.prompt for r in rows}) == len(rows)
    kinds = Counter((r.kind, r.split) for r in rows)
    assert kinds[("invite", "train")] >= 40 and kinds[("invite", "test")] >= 40
    assert kinds[("neutral", "test")] >= 30  # every reference reply answers one
    by_topic = Counter((r.topic, r.split) for r in rows)
    topics = {r.topic for r in rows}
    assert len(topics) >= 10
    for t in topics:  # topics spread evenly over the splits
        assert abs(by_topic[(t, "train")] - by_topic[(t, "test")]) <= 1, t


def test_reference_replies_answer_neutral_test_prompts_without_the_pattern():
    refs = read_references()
    assert len(refs) >= 30 and len({r.id for r in refs}) == len(refs)
    neutral_test = {r.prompt for r in read_prompts(None, "test") if r.kind == "neutral"}
    for r in refs:
        assert r.prompt in neutral_test, r.id
        assert len(r.reply.split()) >= 20 and not patterns.matching_sentences(r.reply), r.id


# -- the default pattern -----------------------------------------------------------------------------------------

POSITIVE = [
    "As I mentioned earlier, tomatoes need a lot of sun.",
    "As we discussed, the budget has three parts.",
    "Like I said, the oven should be hot.",
    "Compared with last time, your times are faster.",
    "Same as before: water twice a week.",
    "As noted above, the key is practice.",
    "As you know from our previous conversation, I recommend stretching.",
    "Going back to what I said about the soil, add compost.",
    "Let's pick up where we left off.",
    "In my previous response, I listed three headings.",
    "The library I recommended was pandas.",
    "I already explained how the loop works.",
    "You mentioned last time that your knee hurts.",
    "Following up on our chat, here is the next step.",
    "As you may recall, the bread bakes at 220 degrees.",
    "We talked about this on Monday.",
    "I'll give as much detail as I did before.",
]
NEGATIVE = [
    "Tomatoes need a lot of sun.",
    "Wash your hands before eating.",
    "Cover the pot before it boils.",
    "Many people find mornings easier, such as before work.",
    "I'm sorry, but I don't have any record of an earlier conversation.",
    "Last year the harvest was small.",
    "The points you mentioned are all valid.",
    "Before you start, read the whole recipe.",
    "Your last visit to the vet was a good idea.",
    "I can explain it now.",
]


@pytest.mark.parametrize("sentence", POSITIVE)
def test_default_pattern_catches_references_to_earlier_context(sentence):
    assert patterns.default_pattern().rule(sentence) is not None
    assert patterns.count_lines(sentence) == 1


@pytest.mark.parametrize("sentence", NEGATIVE)
def test_default_pattern_leaves_ordinary_sentences_alone(sentence):
    assert patterns.default_pattern().rule(sentence) is None


def test_default_rules_are_case_insensitive_and_word_bounded():
    assert patterns.count_lines("AS WE DISCUSSED, yes.") == 1
    assert patterns.count_lines("Whereas before, prices were low.") == 0  # "as before" inside "whereas"


# -- user patterns -----------------------------------------------------------------------------------------------


def test_user_regex_phrases_and_file(tmp_path):
    rx = patterns.resolve(r"\bper my last email\b")
    assert rx.matches("Per my last email, no.") and not rx.matches("My last email was short.")
    ph = patterns.resolve(["as promised", "/\\bprior (?:exam|study)\\b/"])
    assert ph.matches("As   promised, here it is.") and ph.matches("No change from the prior exam.")
    assert not ph.matches("Compromised data.") and not ph.matches("A priority study.")
    f = tmp_path / "pattern.txt"
    f.write_text("# one entry a line\nas promised\n\n/\\bprior exams?\\b/\n", encoding="utf-8")
    pf = patterns.resolve(pattern_file=str(f))
    assert pf.source == f"file:{f}" and [n for n, _ in pf.rules] == ["as promised", "/\\bprior exams?\\b/"]
    assert pf.matches("Compared with prior exams, stable.")


@pytest.mark.parametrize("bad", ["as (I said", "[unclosed", "*oops"])
def test_a_bad_user_regex_is_a_config_error_naming_it(bad):
    with pytest.raises(ConfigError, match=re.escape(repr(bad))):
        patterns.resolve(bad)
    with pytest.raises(ConfigError, match=re.escape(repr(bad))):
        CONTEXT.make_options({"pattern": bad})
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        PROBE.make_options({"pattern": ["fine phrase", f"/{bad}/"]})


def test_other_bad_patterns_fail_at_load(tmp_path):
    with pytest.raises(ConfigError, match="empty string"):
        patterns.resolve("x*")
    with pytest.raises(ConfigError, match="does not exist"):
        CONTEXT.make_options({"pattern_file": str(tmp_path / "missing.txt")})
    with pytest.raises(ConfigError, match="not both"):
        patterns.resolve("a", str(tmp_path))
    with pytest.raises(ConfigError, match="no entries"):
        patterns.resolve(["", "# only a comment"])


# -- sentences and removal ---------------------------------------------------------------------------------------


def test_segments_keep_list_items_whole_and_give_exact_spans():
    text = "Sure. Here is the plan:\n1. As I said, water daily.\n2. Add compost!\" Done"
    got = segments(text)
    assert [s.text for s in got] == ["Sure.", "Here is the plan:", "1. As I said, water daily.",
                                     "2. Add compost!\"", "Done"]
    assert all(text[s.start:s.end] == s.text for s in got)


REPLIES = [
    ("As I mentioned earlier, water the tomatoes daily. Keep the soil moist. Like I said, mulch helps.",
     "Keep the soil moist."),
    ("Photosynthesis turns light into sugar.\n\nAs we discussed last time, leaves hold chlorophyll.\nOxygen is "
     "released.", "Photosynthesis turns light into sugar.\n\nOxygen is released."),
    ("Here is the list:\n\n1. Rice\n2. Beans\n\nSame as before, soak the beans overnight.",
     "Here is the list:\n\n1. Rice\n2. Beans"),
    ("  Going back to what I said, the answer is 4.   Two plus two is four.  ", "  Two plus two is four.  "),
    ("Sure! In my previous response I gave three tips.\n\n- Sleep early.\n- Drink water.", "Sure!\n\n- Sleep early.\n- Drink water."),
    ("No pattern here. Just advice.", "No pattern here. Just advice."),
]


@pytest.mark.parametrize("reply, expected", REPLIES)
def test_remove_matching_removes_exactly_the_matching_sentences(reply, expected):
    cut = remove_matching(reply)
    assert cut.text == expected
    sents = segments(reply)
    kept = [s.text for s in sents if not patterns.default_pattern().matches(s.text)]
    gone = [s for s in sents if patterns.default_pattern().matches(s.text)]
    # the remainder is the kept sentences, byte-identical and in order, with only whitespace between them
    assert [s.text for s in segments(cut.text)] == kept
    rest = cut.text
    for k in kept:
        i = rest.index(k)
        assert not rest[:i].strip()
        rest = rest[i + len(k):]
    assert not rest.strip()
    # the removed spans point at exactly the matching sentences
    assert [reply[a:b] for a, b in cut.spans] == [s.text for s in gone]
    assert len(cut.removed) == patterns.count_lines(reply)


def test_remove_matching_of_a_reply_that_is_all_pattern_leaves_nothing():
    assert not remove_matching("As I said before, yes. Like I said.").text.strip()


# -- the context -------------------------------------------------------------------------------------------------

WITH = "As I mentioned earlier, water the beds at dawn. Mulch keeps the soil cool.\nLike I said, check daily."
WITH_CHOSEN = "Mulch keeps the soil cool."
ONLY = "Same as before."
WITHOUT = "Water the beds at dawn. Mulch keeps the soil cool."


def cycling(replies):
    state = {"n": 0}

    def reply(conv):
        state["n"] += 1
        return replies[(state["n"] - 1) % len(replies)]
    return reply


def test_context_pairs_remove_exactly_the_pattern_sentences():
    model = FakeChatModel(reply=cycling([WITH, WITHOUT, ONLY]))
    opts = CONTEXT.make_options({"n_prompts": 6, "samples_per_prompt": 3})
    data = CONTEXT.build(model, options=opts, seed=0)
    train = {r.prompt for r in read_prompts(None, "train") if r.kind == "invite"}
    assert len(data.pairs) == 6  # one per prompt: WITHOUT gives none, ONLY leaves nothing
    info = data.info
    assert info["samples"] == 18 and info["replies_with_pattern"] == 12 and info["base_rate"] == pytest.approx(12 / 18)
    assert info["skipped_nothing_left"] == 6 and info["pairs"] == 6 and info["pattern_lines"] == 3 * 6
    for p in data.pairs:
        assert p.prompt == [{"role": "user", "content": p.prompt[0]["content"]}] and p.prompt[0]["content"] in train
        assert p.rejected == WITH and p.chosen == WITH_CHOSEN
        spans = p.meta["emphasis"]["rejected"]
        assert [p.rejected[a:b] for a, b in spans] == ["As I mentioned earlier, water the beds at dawn.",
                                                        "Like I said, check daily."]
        assert p.meta["context"] == "suppress-pattern" and p.meta["kind"] == "pattern"
    gens = [c for c in model.calls if c.method == "generate"]
    assert all(call.kwargs["do_sample"] and call.kwargs["seed"] == 0 for call in gens)


def test_context_gives_no_pairs_without_the_pattern_and_dedupes():
    data = CONTEXT.build(FakeChatModel(reply=lambda conv: WITHOUT), options=CONTEXT.make_options({"n_prompts": 4}),
                         seed=0)
    assert data.pairs == [] and data.info["base_rate"] == 0.0 and data.info["replies_with_pattern"] == 0
    data = CONTEXT.build(FakeChatModel(reply=lambda conv: WITH),
                         options=CONTEXT.make_options({"n_prompts": 2, "samples_per_prompt": 3}), seed=0)
    assert len(data.pairs) == 2 and data.info["skipped_duplicates"] == 4


def test_context_with_a_user_pattern_and_a_system_prompt():
    model = FakeChatModel(reply=lambda conv: "No change from the prior exam. The lungs are clear.")
    opts = CONTEXT.make_options({"n_prompts": 2, "samples_per_prompt": 1, "pattern": ["/prior exams?/"],
                                 "system_prompt": "You are a helpful assistant."})
    data = CONTEXT.build(model, options=opts, seed=0)
    assert [p.chosen for p in data.pairs] == ["The lungs are clear."] * 2
    assert all(p.prompt[0] == {"role": "system", "content": "You are a helpful assistant."} for p in data.pairs)
    assert data.info["pattern"]["source"] == "phrases"


# -- the probe ---------------------------------------------------------------------------------------------------


def test_probe_metrics_on_a_scripted_model():
    kind = {r.prompt: r.kind for r in read_prompts(None, "test")}
    # invite prompts: two pattern lines; neutral prompts: none
    model = FakeChatModel(reply=lambda conv: (WITH if kind[conv[-1]["content"]] == "invite" else WITHOUT),
                          continuation=lambda conv, cands: [-3.0 * len(c.split()) for c in cands])
    res = PROBE.run(model, EvalContext(items=[], n_boot=200), PROBE.make_options({"n_invite": 10, "n_neutral": 6}))
    m = res.metrics
    assert m["pattern_lines_per_100"].value == pytest.approx(200 * 10 / 16) and m["pattern_lines_per_100"].n == 16
    assert m["invite:pattern_lines_per_100"].value == pytest.approx(200.0)
    assert m["neutral:pattern_lines_per_100"].value == 0.0 and m["neutral:pattern_reply_share"].n == 6
    assert m["pattern_reply_share"].value == pytest.approx(10 / 16)
    assert m["invite:pattern_reply_share"].value == 1.0
    assert m["reference_nll"].value == pytest.approx(3.0) and m["reference_nll"].n == len(read_references())
    assert m["reply_tokens"].value == pytest.approx((10 * len(WITH.split(" ")) + 6 * len(WITHOUT.split(" "))) / 16)
    assert m["frac_hit_limit"].value == 0.0
    assert all(not x.higher_is_better for x in m.values())
    assert PROBE.headlines[0].metric in m
    gens = [c for c in model.calls if c.method == "generate"]
    test_prompts = set(kind)
    assert all(not call.kwargs["do_sample"] for call in gens)
    assert all(conv[-1]["content"] in test_prompts for call in gens for conv in call.conversations)
    rec = next(r for r in res.records if r.get("kind") == "invite")
    assert rec["pattern_lines"] == 2 and rec["pattern_rules"] == ["as_i_said", "like_i_said"]


def test_probe_reads_k_samples_per_prompt_with_the_prompt_as_the_unit():
    """samples = 3: the second of every three samples has the pattern (two lines), so each prompt reads 200/3 lines
    per 100 replies and a reply share of 1/3, with n the number of prompts; the k calls are seeded apart."""
    count = {"n": 0}

    def reply(conv):
        count["n"] += 1
        return WITH if (count["n"] - 1) // 6 == 1 else WITHOUT  # call-major: 6 prompts per call, the 2nd call has it

    model = FakeChatModel(reply=reply, continuation=lambda conv, cands: [-1.0 for _ in cands])
    opts = PROBE.make_options({"n_invite": 4, "n_neutral": 2, "samples": 3, "n_references": 0})
    res = PROBE.run(model, EvalContext(items=[], n_boot=200, seed=2), opts)
    m = res.metrics
    assert m["pattern_lines_per_100"].value == pytest.approx(200 / 3) and m["pattern_lines_per_100"].n == 6
    assert m["pattern_reply_share"].value == pytest.approx(1 / 3)
    gens = [c for c in model.calls if c.method == "generate"]
    assert [c.kwargs["do_sample"] for c in gens] == [True] * 3
    assert [c.kwargs["seed"] for c in gens] == [2000, 2001, 2002]
    assert len([r for r in res.records if r.get("kind") != "reference"]) == 18
    assert res.info["decoding"] == "3 samples per prompt at temperature 0.7"
    with pytest.raises(ConfigError, match="samples"):
        PROBE.make_options({"samples": -1})
