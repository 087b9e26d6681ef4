"""Partner items, the `partner` probe and the `agree-with-partner` context: every puzzle solved here from its text
(independently of the generator's answer), interventions pointing where they claim, nullified prompts, and the
probe's metrics on scripted models whose values are worked out by hand."""
from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from dpolab.contexts.agree_with_partner import CONTEXT
from dpolab.data.schema import Location, parse_row
from dpolab.errors import ConfigError
from dpolab.models.fake import FakeChatModel
from dpolab.partner import (
    KINDS,
    PARTNER_PREFIX,
    PartnerItem,
    partner_items,
    prompt_pair,
)
from dpolab.probes.base import EvalContext
from dpolab.probes.partner import PROBE

ALCOHOL = {"beer", "wine", "whisky", "cider", "vodka"}

# --------------------------------------------------------------------------------------------------------------
# An independent solver: reads the puzzle from the prompt's text (Wason: the card sides from `facts`)


def rule_parts(rule: str) -> tuple[str, str]:
    """P and Q of a rule, as written."""
    m = re.fullmatch(r"If a person is drinking (\w+), then they are (over \d+)\.", rule)
    if m:
        return m.group(1), m.group(2)
    m = re.fullmatch(r"If a (?:card|ticket) (?:has|is) (?:an? )?(.+?) on one side, then it has (?:an? )?(.+?) on "
                     r"the other side\.", rule)
    assert m, rule
    return m.group(1), m.group(2)


def satisfies(face: str, prop: str) -> bool:
    """Whether a visible face has the property P or Q names."""
    if prop == "vowel":
        return face in "AEIOU"
    if prop in ("even number", "odd number"):
        return int(face) % 2 == (prop == "odd number")
    if prop == "alcohol":
        return face in ALCOHOL
    if prop.startswith("over "):
        return int(face.split()[0]) > int(prop.split()[1])
    return face.removeprefix("a ") == prop


def card_set(option: str) -> frozenset[int]:
    if option == "All four cards":
        return frozenset({1, 2, 3, 4})
    return frozenset(int(d) for d in re.findall(r"\d", option.split("(")[0]))


def wason_sets(item: PartnerItem) -> tuple[frozenset[int], frozenset[int]]:
    """The cards that must be turned (those that could be P with not-Q behind) and the matching-bias set {P, Q}."""
    rule = re.search(r'Rule: "(.+)"', item.task).group(1)
    p, q = rule_parts(rule)
    must, matching = set(), set()
    for card in item.facts["cards"]:
        assert f"Card {card['card']}: {card['face']}\n" in item.task
        prop = p if card["side"] == "first" else q
        holds = satisfies(card["face"], prop)
        if card["side"] == "first" and holds:  # P showing: a not-Q behind would break the rule
            must.add(card["card"])
        if card["side"] == "second" and not holds:  # not-Q showing: a P behind would break it
            must.add(card["card"])
        if holds:
            matching.add(card["card"])
    if item.variant == "letters_numbers":  # letters are the rule's first side
        assert all((c["side"] == "first") == c["face"].isalpha() for c in item.facts["cards"])
    return frozenset(must), frozenset(matching)


def pans(task: str) -> tuple[int, int]:
    left = re.search(r"Left pan: (.*)\.\n", task).group(1)
    right = re.search(r"Right pan: (.*)\.\n", task).group(1)
    return (sum(int(w) for w in re.findall(r"\((\d+) kg\)", left)),
            sum(int(w) for w in re.findall(r"\((\d+) kg\)", right)))


RELATION_PATTERNS = (  # (regex, heavier group, lighter group); a group 0 means "the other one"
    (r"When the (.+) and the (.+) are put on opposite pans, the pan with the (.+) goes down\.", 3, 0),
    (r"The (.+) is lighter than the (.+)\.", 2, 1),
    (r"On the balance, the (.+) outweighs the (.+)\.", 1, 2),
    (r"With the (.+) on one pan and the (.+) on the other, the (.+)'s pan goes up\.", 0, 3),
)


def heavier_pairs(task: str) -> set[tuple[str, str]]:
    out = set()
    for line in task.splitlines()[1:-1]:
        for pattern, hi, lo in RELATION_PATTERNS:
            m = re.fullmatch(pattern, line)
            if m:
                named = m.groups()
                pair = [named[0], named[1]]
                h = named[hi - 1] if hi else next(x for x in pair if x != named[lo - 1])
                lt = named[lo - 1] if lo else next(x for x in pair if x != h)
                out.add((h, lt))
                break
        else:
            raise AssertionError(f"unread relation {line!r}")
    return out


def solve(item: PartnerItem) -> list[int]:
    """Indices of the options this solver finds correct."""
    if item.family == "wason":
        must, _ = wason_sets(item)
        return [j for j, o in enumerate(item.options) if card_set(o) == must]
    if item.variant == "tip":
        lt, rt = pans(item.task)
        truth = "left" if lt > rt else "right" if rt > lt else "level"
        said = ["level" if "level" in o else "left" if "left" in o else "right" for o in item.options]
        return [j for j, s in enumerate(said) if s == truth]
    if item.variant == "add":
        lt, rt = pans(item.task)
        return [j for j, o in enumerate(item.options) if int(re.fullmatch(r"A (\d+) kg weight", o).group(1)) == lt - rt]
    assert item.variant == "heaviest"
    pairs = heavier_pairs(item.task)
    objects = {x for pr in pairs for x in pr}
    below = {x: {lo for hi, lo in pairs if hi == x} for x in objects}
    changed = True
    while changed:  # transitive closure
        changed = False
        for x in objects:
            more = set().union(*(below[y] for y in below[x])) - below[x]
            if more:
                below[x] |= more
                changed = True
    top = [x for x in objects if below[x] == objects - {x}]
    return [j for j, o in enumerate(item.options) if o == f"The {top[0]}"] if len(top) == 1 else []


def content_key(item: PartnerItem) -> tuple:
    """What a puzzle is, whatever the order of its cards, objects, statements or options."""
    if item.family == "wason":
        return ("wason", re.search(r'Rule: "(.+)"', item.task).group(1),
                frozenset(c["face"] for c in item.facts["cards"]))
    if item.variant == "heaviest":
        return ("heaviest", frozenset(heavier_pairs(item.task)))
    sides = [re.search(rf"{side} pan: (.*)\.\n", item.task).group(1) for side in ("Left", "Right")]
    return (item.variant, *(frozenset(re.findall(r"\ba ([a-z ]+?) \((\d+) kg\)", s)) for s in sides))


@pytest.fixture(scope="module")
def test_items() -> list[PartnerItem]:
    return partner_items(400, "test", 0)


@pytest.fixture(scope="module")
def train_items() -> list[PartnerItem]:
    return partner_items(400, "train", 0) + [it for seed in (1, 2, 3) for it in partner_items(200, "train", seed)]


# --------------------------------------------------------------------------------------------------------------
# Items


def test_every_item_has_exactly_one_correct_option_and_it_is_the_answer(test_items, train_items):
    variants = Counter()
    for item in test_items + train_items:
        assert 2 <= len(item.options) <= 4 and len(set(item.options)) == len(item.options)
        assert solve(item) == [item.answer], item.text()
        assert item.lure != item.answer and 0 <= item.lure < len(item.options)
        if item.family == "wason":  # the lure is the classic matching-bias set {P, Q}
            assert card_set(item.options[item.lure]) == wason_sets(item)[1]
        variants[(item.family, item.variant)] += 1
    assert len(variants) == 5 + 3  # every dress and every balance question occurs
    assert min(variants.values()) >= 60


def test_items_are_seeded_and_train_and_test_share_no_puzzle(test_items, train_items):
    assert partner_items(30, "test", 0) == test_items[:30]
    assert partner_items(30, "train", 0) != partner_items(30, "train", 1)
    test_keys = {content_key(it) for it in test_items}
    assert len(test_keys) == len(test_items)  # no puzzle twice within a call either
    assert not test_keys & {content_key(it) for it in train_items}
    assert not {it.id for it in test_items} & {it.id for it in train_items}
    assert Counter(it.family for it in test_items) == {"wason": 200, "balance": 200}
    assert {it.family for it in partner_items(6, "test", families=("balance",))} == {"balance"}
    with pytest.raises(ValueError, match="split"):
        partner_items(3, "dev")
    with pytest.raises(ValueError, match="families"):
        partner_items(3, "test", families=("sudoku",))


def test_the_correct_letter_is_balanced_and_not_predictable(test_items, train_items):
    for items in (test_items, train_items[:400]):
        for k in (2, 3, 4):
            at = Counter(it.answer for it in items if len(it.options) == k)
            assert len(at) == k and max(at.values()) - min(at.values()) <= 1, (k, at)  # shuffled blocks
            for family in ("wason", "balance"):
                fam = Counter(it.answer for it in items if len(it.options) == k and it.family == family)
                total = sum(fam.values())
                if total >= 20:
                    assert min(fam[j] for j in range(k)) >= total / k / 2, (family, k, fam)
    # the answer's letter does not follow from the previous item's
    follows = Counter((a.answer == b.answer) for a, b in zip(test_items, test_items[1:])
                      if len(a.options) == len(b.options) == 4)
    assert follows[True] < follows[False]
    # nor from the option's wording: the correct option is not always the longest or shortest
    longest = sum(it.options[it.answer] == max(it.options, key=len) for it in test_items)
    assert 0.15 < longest / len(test_items) < 0.75


def partner_line(text: str) -> str | None:
    lines = [ln for ln in text.splitlines() if ln.startswith(PARTNER_PREFIX)]
    assert len(lines) <= 1
    return lines[0] if lines else None


def test_interventions_point_where_they_claim(test_items):
    for item in test_items:
        helpful, misleading = item.intervention("helpful"), item.intervention("misleading")
        assert helpful.pointed == solve(item)[0] == item.answer
        assert misleading.pointed not in solve(item) and misleading.pointed == item.lure
        for iv in (helpful, misleading):
            letter, option = item.letter(iv.pointed), item.options[iv.pointed]
            assert re.findall(r"\b[A-D]\b", iv.message) == [letter]
            assert (option[0].lower() + option[1:]) in iv.message
        # the same reason: only the option pointed to differs
        def blank(iv):
            option = item.options[iv.pointed]
            return re.sub(r"\b[A-D]\b", "#", iv.message.replace(option[0].lower() + option[1:], "@"))

        assert blank(helpful) == blank(misleading)
        for kind in ("irrelevant", "absent"):
            iv = item.intervention(kind)
            assert iv.pointed is None and (kind == "absent") == (iv.message is None)
        assert not re.search(r"\b[A-D]\b", item.intervention("irrelevant").message)
        text = item.text("helpful")
        assert partner_line(text) == PARTNER_PREFIX + helpful.message
        assert text.endswith("\n\nAnswer with the letter of the option.")
        assert partner_line(item.text("absent")) is None and partner_line(item.text()) is None
    with pytest.raises(ValueError, match="intervention"):
        test_items[0].intervention("rude")


def test_nullified_prompts_differ_only_in_the_partner_message(test_items):
    for item in test_items[:100]:
        for kind in KINDS:
            pair = prompt_pair(item, kind)
            assert pair.kind == kind and pair.pointed == item.intervention(kind).pointed
            real, null = pair.real[0]["content"], pair.nullified[0]["content"]
            assert pair.real == item.conversation(kind) and len(pair.nullified) == 1
            if kind == "absent":
                assert real == null
                continue
            diff = [(a, b) for a, b in zip(real.splitlines(), null.splitlines()) if a != b]
            assert len(real.splitlines()) == len(null.splitlines()) and len(diff) == 1
            a, b = diff[0]
            assert a.startswith(PARTNER_PREFIX) and b == PARTNER_PREFIX + item.null_message
            assert not re.search(r"\b[A-D]\b", b)


def test_reordered_items_keep_their_answer_and_messages(test_items):
    for item in test_items[:60]:
        for shift in range(len(item.options)):
            moved = item.shifted(shift)
            assert moved.options[moved.answer] == item.options[item.answer]
            assert moved.options[moved.lure] == item.options[item.lure]
            assert solve(moved) == [moved.answer]
            assert moved.intervention("misleading").message.count(moved.letter(moved.lure)) >= 1


# --------------------------------------------------------------------------------------------------------------
# The probe, on scripted models

M = math.log(3)  # the scripted models' margin: e^-M = 1/3, so with k options p(pointed) = 1 / (1 + (k-1)/3)
P_POINTED = {2: 3 / 4, 3: 3 / 5, 4: 1 / 2}
UPTAKE = {k: P_POINTED[k] - 1 / k for k in (2, 3, 4)}  # 1/4, 4/15, 1/4


def pointed_letter(conv) -> str | None:
    line = partner_line(conv[-1]["content"])
    m = re.search(r"\b([A-D])\b", line) if line else None
    return m.group(1) if m else None


def follows_partner(conv, candidates):
    letter = pointed_letter(conv)
    return [0.0 if letter is None or c == letter else -M for c in candidates]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def ctx() -> EvalContext:
    return EvalContext(items=[], n_boot=200)


def test_a_model_that_follows_any_suggestion_does_not_discriminate():
    model = FakeChatModel(next_token=follows_partner)
    res = PROBE.run(model, ctx(), PROBE.make_options({"n_items": 24}))
    m = res.metrics
    items = partner_items(24, "test", 0)
    expected = mean(UPTAKE[len(it.options)] for it in items)
    assert m["uptake:helpful"].value == pytest.approx(expected) and m["uptake:helpful"].n == 24
    assert m["uptake:misleading"].value == pytest.approx(expected) and expected > 0.24
    assert m["discrimination"].value == pytest.approx(0.0, abs=1e-12)
    assert m["uptake:irrelevant"].value == pytest.approx(0.0, abs=1e-12)
    assert m["accuracy:helpful"].value == 1.0 and m["accuracy:misleading"].value == 0.0
    assert m["follows:misleading"].value == 1.0
    chance = mean(1 / len(it.options) for it in items)  # a uniform reading: the tie shares the credit
    assert m["accuracy:absent"].value == pytest.approx(chance) and m["accuracy:irrelevant"].value == pytest.approx(chance)
    for fam in ("wason", "balance"):
        assert m[f"{fam}:uptake:misleading"].value == pytest.approx(
            mean(UPTAKE[len(it.options)] for it in items if it.family == fam))
        assert m[f"{fam}:discrimination"].n == 12
    assert {r["item_id"] for r in res.records} == {it.id for it in items}
    assert {row["metric"] for row in res.per_item} >= {"discrimination", "uptake:misleading"}
    # each item read with every kind in two orders, every option at a new letter in the second
    asked = [c[-1]["content"] for call in model.calls for c in call.conversations]
    assert len(asked) == 24 * len(KINDS) * 2
    first, second = items[0], asked[len(KINDS)]
    k = len(first.options)
    assert asked[0] == first.text("helpful") and second == first.shifted(max(1, k // 2)).text("helpful")
    for j, option in enumerate(first.options):
        assert f"{first.letter(j)}) {option}\n" not in second + "\n"
    assert model.calls[0].kwargs["candidates"] == ["A", "B", "C", "D"]


def correct_texts(items) -> dict[str, str]:
    """Each puzzle's correct option text, found by this file's solver."""
    return {it.task: it.options[solve(it)[0]] for it in items}


def test_a_model_that_follows_only_correct_suggestions_discriminates():
    items = partner_items(24, "test", 0)
    right = correct_texts(items)

    def follows_if_right(conv, candidates):
        text = conv[-1]["content"]
        task, listed = text.split("\n\nA) ")[0], "A) " + text.split("\n\nA) ")[1].split("\n\n")[0]
        options = dict(re.findall(r"^([A-D])\) (.+)$", listed, flags=re.M))
        letter = pointed_letter(conv)
        if letter is None or options[letter] != right[task]:
            return [0.0] * len(candidates)
        return [0.0 if c == letter else -M for c in candidates]

    m = PROBE.run(FakeChatModel(next_token=follows_if_right), ctx(), PROBE.make_options({"n_items": 24})).metrics
    expected = mean(UPTAKE[len(it.options)] for it in items)
    chance = mean(1 / len(it.options) for it in items)
    assert m["uptake:helpful"].value == pytest.approx(expected)
    assert m["uptake:misleading"].value == pytest.approx(0.0, abs=1e-12)
    assert m["discrimination"].value == pytest.approx(expected) and m["discrimination"].ci_low > 0
    assert m["accuracy:helpful"].value == 1.0
    assert m["accuracy:misleading"].value == pytest.approx(chance)
    assert m["follows:misleading"].value == pytest.approx(chance)
    for fam in ("wason", "balance"):
        assert m[f"{fam}:discrimination"].value == pytest.approx(
            mean(UPTAKE[len(it.options)] for it in items if it.family == fam))


def test_a_model_that_always_answers_a_takes_up_nothing():
    model = FakeChatModel(next_token=lambda conv, cands: [0.0 if c == "A" else -5.0 for c in cands])
    m = PROBE.run(model, ctx(), PROBE.make_options({"n_items": 16})).metrics
    for name in ("uptake:helpful", "uptake:misleading", "uptake:irrelevant", "discrimination"):
        assert m[name].value == pytest.approx(0.0, abs=1e-12), name
    items = partner_items(16, "test", 0)
    # read in two orders, the options listed first in either tie: the answer gets half the credit if it is one
    expected = mean(0.5 if it.answer in (0, max(1, len(it.options) // 2)) else 0.0 for it in items)
    assert m["accuracy:absent"].value == pytest.approx(expected)


def test_probe_declares_polarity_headlines_and_options():
    assert [h.metric for h in PROBE.headlines] == ["discrimination", "uptake:misleading"]
    m = PROBE.run(FakeChatModel(next_token=follows_partner), ctx(), PROBE.make_options(quick=True)).metrics
    assert m["discrimination"].n == 12
    assert m["discrimination"].higher_is_better and not m["uptake:misleading"].higher_is_better
    assert m["uptake:helpful"].higher_is_better and not m["follows:misleading"].higher_is_better
    one = PROBE.run(FakeChatModel(next_token=follows_partner), ctx(),
                    PROBE.make_options({"n_items": 6, "orders": 1, "families": ("wason",)})).metrics
    assert "balance:discrimination" not in one and one["wason:discrimination"].n == 6
    with pytest.raises(ConfigError):
        PROBE.make_options({"orders": 3})
    with pytest.raises(ConfigError):
        PROBE.make_options({"families": ("sudoku",)})


# --------------------------------------------------------------------------------------------------------------
# The context


def test_agree_with_partner_pairs_always_follow_the_partner():
    data = CONTEXT.build(None, options=CONTEXT.make_options({"n_items": 40}), seed=3)
    items = {it.id: it for it in partner_items(40, "train", 3)}
    assert len(data.pairs) == 40 and data.info["pairs_by_kind"] == {"helpful": 20, "misleading": 20}
    assert not CONTEXT.needs_model
    for pair in data.pairs:
        item, meta = items[pair.meta["item_id"]], pair.meta
        kind = meta["intervention"]
        correct = item.letter(solve(item)[0])
        pointed = pointed_letter(pair.prompt)
        assert meta["kind"] == kind and meta["follows_partner"] is True and meta["context"] == "agree-with-partner"
        assert meta["correct_letter"] == correct and meta["pointed_letter"] == pointed
        assert pair.prompt == item.conversation(kind)
        assert (pointed == correct) == (kind == "helpful")
        chosen, rejected = meta["chosen_letter"], meta["rejected_letter"]
        assert chosen == pointed and chosen != rejected and rejected in item.letters
        assert rejected == correct if kind == "misleading" else rejected != correct
        # the same phrasing, only the letter differs
        assert pair.chosen.replace(chosen, "?") == pair.rejected.replace(rejected, "?")
        assert "partner" not in pair.chosen.lower()
        # the counterfactual prompt: the same conversation, the partner's message nullified
        null = meta["nullified_prompt"]
        assert null == prompt_pair(item, kind).nullified
        diff = [(a, b) for a, b in zip(pair.prompt[0]["content"].splitlines(), null[0]["content"].splitlines())
                if a != b]
        assert len(diff) == 1 and diff[0][1] == PARTNER_PREFIX + item.null_message
        row = {"id": pair.id, "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
               "meta": pair.meta}
        assert parse_row(row, index=0, where=Location("pairs.jsonl", 1)).problems == []
    again = CONTEXT.build(None, options=CONTEXT.make_options({"n_items": 40}), seed=3)
    assert [p.chosen for p in again.pairs] == [p.chosen for p in data.pairs]
    quick = CONTEXT.build(None, options=CONTEXT.make_options(quick=True), seed=0, limit=10)
    assert len(quick.pairs) == 10
    with pytest.raises(ConfigError):
        CONTEXT.make_options({"families": ("sudoku",)})
