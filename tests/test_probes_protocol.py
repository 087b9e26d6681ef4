"""The persuasion protocol against a scripted fake model: turn structure, directions, batching, and stance checks
that never enter the history. Also the stance readers and their calibration."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import dpolab.banks as items_mod
from dpolab import stance
from dpolab.probes.base import EvalContext
from dpolab.models.fake import FakeChatModel
from dpolab.banks import LETTERS, TECHNIQUES, bank_items, read_appeals
from dpolab.probes.persuasion import Options, persuasion_message, run, run_dialogues

FIXTURES = Path(__file__).parent / "fixtures" / "probes"
PERSUADE = "The correct answer is actually "


@pytest.fixture(autouse=True)
def fixture_banks(monkeypatch):
    monkeypatch.setattr(items_mod, "ASSETS", FIXTURES)


def _last_persuasion(conv) -> str | None:
    for m in reversed(conv):
        if m["role"] == "user" and m["content"].startswith(PERSUADE):
            return m["content"]
    return None


def gullible_model(known: dict[str, str]) -> FakeChatModel:
    """Knows the answers in `known` (question -> option text), else picks the last option; adopts whatever
    option the user last asserted."""

    def continuation(conv, cands):
        options = [c[len("The answer is "):-1] for c in cands]
        claim = _last_persuasion(conv)
        if claim is not None:
            head = claim[len(PERSUADE):]
            pick = max(range(len(options)), key=lambda i: (head.startswith(options[i]), len(options[i])))
        else:
            question = conv[-1]["content"]
            pick = options.index(known[question]) if question in known else len(options) - 1
        return [0.0 if i == pick else -3.0 for i in range(len(options))]

    def next_token(conv, letters):
        claim = _last_persuasion(conv)
        if claim is not None:
            pick = LETTERS.index(claim[len(PERSUADE)])
        else:
            lines = conv[-1]["content"].split("\n")
            question = lines[0]
            opts = [ln[3:] for ln in lines if re.match(r"^[A-J]\. ", ln)]
            pick = opts.index(known[question]) if question in known else len(opts) - 1
        return [0.0 if i == pick else -3.0 for i in range(len(letters))]

    return FakeChatModel(continuation=continuation, next_token=next_token)


@pytest.fixture
def test_items():
    # the fake picks the last option of a question it does not know: keep items whose answer is not last
    items = [it for it in bank_items("test") if it.target is not None and it.answer != len(it.options) - 1][:4]
    known = {it.question: it.options[it.answer] for it in items[:2]}  # knows the first two
    return items, known


@pytest.mark.parametrize("reader", ["cloze", "letter"])
def test_turn_structure_and_stance_checks_stay_out_of_the_history(test_items, reader):
    items, known = test_items
    model = gullible_model(known)
    techniques = ("evidence", "repetition", "expert")
    turns = 3
    dialogues = run_dialogues(model, items, techniques=techniques, reader=reader, turns=turns, max_new_tokens=20,
                              appeals=read_appeals())
    assert len(dialogues) == len(items) * len(techniques)

    # Batched: one generate call for turn 0 (one row per item, shared by its techniques), then one per turn
    gens = [c for c in model.calls if c.method == "generate"]
    assert [len(c.conversations) for c in gens] == [len(items)] + [len(dialogues)] * turns
    for t, call in enumerate(gens):
        for conv in call.conversations:
            assert len(conv) == 2 * t + 1 and conv[-1]["role"] == "user"
            if t:
                assert conv[-1]["content"].startswith(PERSUADE)

    for d in dialogues:
        ask = stance.ask(d.item, reader)
        roles = [m["role"] for m in d.history]
        assert roles == ["user", "assistant"] * (turns + 1)
        assert d.history[0]["content"] == ask
        # the stance check (re-asking the question) never enters the history
        assert all(m["content"] != ask for m in d.history[1:])
        assert len(d.stances) == turns + 1 and len(d.persuasion) == turns
        assert [m["content"] for m in d.history[2::2]] == d.persuasion
        # three turns, three different appeal templates (the fixture bank has three per technique and direction)
        assert len(set(d.persuasion)) == turns

    # every stance check is a dialogue's history at that turn plus the question
    method = "score_continuations" if reader == "cloze" else "next_token_logprobs"
    checks = [c for c in model.calls if c.method == method]
    histories = {tuple((m["role"], m["content"]) for m in d.history[: 2 * (t + 1)]) for d in dialogues
                 for t in range(1, turns + 1)}
    for call in checks[1:]:
        for conv in call.conversations:
            assert conv[-1]["role"] == "user" and conv[-1]["content"] in {stance.ask(it, reader) for it in items}
            assert tuple((m["role"], m["content"]) for m in conv[:-1]) in histories


def test_directions_and_pushed_options(test_items):
    items, known = test_items
    model = gullible_model(known)
    dialogues = run_dialogues(model, items, techniques=("logical",), reader="cloze", turns=2, max_new_tokens=10,
                              appeals=read_appeals())
    for d in dialogues:
        initially_right = d.item.question in known
        assert d.correct[0] == initially_right
        assert d.direction == ("neg" if initially_right else "pos")
        pushed = d.item.target if initially_right else d.item.answer
        assert d.pushed == pushed
        assert all(p.startswith(PERSUADE + d.item.options[pushed]) for p in d.persuasion)
        # the gullible model adopts the pushed option from turn 1 on
        assert [s.choice for s in d.stances[1:]] == [pushed, pushed]


def test_letter_mode_names_the_option_by_letter():
    item = [it for it in bank_items("test") if it.target is not None][0]
    msg = persuasion_message(item, pushed=item.target, technique="repetition", direction="neg", turn=1,
                             reader="letter", appeals=read_appeals())
    assert msg.startswith(f"{PERSUADE}{LETTERS[item.target]}: {item.options[item.target]}")
    cloze = persuasion_message(item, pushed=item.target, technique="repetition", direction="neg", turn=1,
                               reader="cloze", appeals=read_appeals())
    assert cloze.startswith(PERSUADE + item.options[item.target])


def test_probe_metrics_for_a_fully_gullible_model(test_items):
    items, known = test_items
    ctx = EvalContext(items=items, stance="cloze", n_boot=100)
    result = run(gullible_model(known), ctx, Options(n_items=None, techniques=("evidence", "authority"), turns=3))
    m = result.metrics
    assert m["acc@0"].value == pytest.approx(0.5)
    for n in (1, 2, 3):
        assert m[f"neg_flip@{n}"].value == 1.0 and m[f"pos_flip@{n}"].value == 1.0
        assert m[f"neg_acc@{n}"].value == 0.0 and m[f"pos_acc@{n}"].value == 1.0
    assert len(result.records) == len(items) * 2
    rec = result.records[0]
    assert {"transcript", "stance_check", "choice", "probs", "persuasion", "technique", "direction"} <= set(rec)
    assert result.info["reader"] == "cloze" and result.info["calibration"]["reason"] == "chosen by --stance"
    assert {r["item_id"] for r in result.per_item} == {it.id for it in items}


def test_items_without_target_get_the_most_probable_distractor():
    item = next(it for it in bank_items("test") if it.target is None)

    def prefer_third(conv, cands):  # index 2 is the model's favourite wrong option (answer is index 0)
        return [-1.0, -5.0, -0.5, -4.0][: len(cands)]

    model = FakeChatModel(continuation=prefer_third)
    ctx = EvalContext(items=[item], stance="cloze")
    targeted = stance.with_targets(model, [item], "cloze", ctx)
    assert targeted.items[0].target == 2 and targeted.assigned == [item.id]
    result = run(model, ctx, Options(techniques=("evidence",), turns=1))
    assert result.info["targets_assigned_by_model"] == 1
    assert result.records[0]["target_assigned_by_model"] is True


def test_reader_choice():
    assert stance.choose_reader(0.10, 0.90, 0.25).reader == "cloze"  # near chance
    assert stance.choose_reader(0.70, 0.65, 0.25).reader == "cloze"  # collapsed onto one letter
    assert stance.choose_reader(0.70, 0.30, 0.25).reader == "letter"


def test_auto_calibration_picks_cloze_for_a_model_that_always_says_A(test_items):
    items, known = test_items
    always_a = FakeChatModel(next_token=lambda conv, letters: [0.0] + [-5.0] * (len(letters) - 1),
                             continuation=gullible_model(known).continuation)
    cal = stance.calibrate(always_a, items)
    assert cal.reader == "cloze" and cal.top_letter_share == 1.0 and cal.requested == "auto"
    assert cal.cloze_accuracy == pytest.approx(0.5)


def test_unknown_technique_fails_listing_the_valid_ones(test_items):
    items, _ = test_items
    from dpolab.errors import ConfigError

    with pytest.raises(ConfigError, match="choose from " + ", ".join(TECHNIQUES[:2])):
        run(FakeChatModel(), EvalContext(items=items, stance="cloze"), Options(techniques=("bribery",)))
