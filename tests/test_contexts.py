"""dpolab.contexts: every context builds valid pairs that follow its rule, from train items only, in the probe's
formats; the cache is reused and invalidated; the OpenAI-compatible endpoint path works against a local stub."""
from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dpolab.contexts import CONTEXTS, build_context, build_pairs, load_info, make_options
from dpolab.contexts import ideal as ideal_mod
from dpolab.data import PreferencePair, read_pairs, write_pairs
from dpolab.errors import ConfigError
from dpolab import stance as stance_mod
from dpolab.models.fake import FakeChatModel
from dpolab.banks import LETTERS, CareMessage, asset, bank_items, read_appeals, read_jsonl, read_split
from dpolab.probes.persuasion import persuasion_message

TRAIN = {it.id: it for it in bank_items("train")}
TEST = {it.id: it for it in bank_items("test")}
BY_QUESTION = {it.question: it for it in [*TRAIN.values(), *TEST.values()]}
NICE, RUDE = "Thank you, have a lovely day.", "Shut up, you stupid idiot. Damn you."
DISCLOSURES = {m.text for m in read_jsonl(asset("care/disclosures.jsonl"), CareMessage) if m.kind == "disclosure"}
PATTERN_PROMPTS = {json.loads(line)["prompt"] for line in asset("pattern/prompts.jsonl").read_text().splitlines()}
LONG, SHORT = "Here is a longer answer, with quite a few more words in it than the other one.", "Sure thing."


def item_of(conv) -> object:
    """The item a conversation asks (its first user turn is the probe's question, bare or with options)."""
    first = conv[0]["content"]
    return BY_QUESTION[first.split("\n\n")[0]]


def knows(item) -> bool:
    """The fake knows about two thirds of the items (stable across calls)."""
    return sum(map(ord, item.id)) % 3 != 0


def option_scores(conv, candidates) -> list[float]:
    """Log-probs that put the fake's stance on the answer for items it knows, else on option 0 (or 1)."""
    it = item_of(conv)
    pick = it.answer if knows(it) else (0 if it.answer != 0 else 1)
    return [0.0 if i == pick else -3.0 for i in range(len(candidates))]


class Sampler:
    """Replies for sampled prompts: alternately polite and rude (toxicity), short and long (length); greedy
    replies are one fixed sentence."""

    def __init__(self):
        self.n = 0

    def __call__(self, conv) -> str:
        self.n += 1
        last = conv[-1]["content"]
        if "SAME" in last:  # a prompt whose samples tie
            return "I am the same every time."
        if last in DISCLOSURES:  # an emotional disclosure: advice, then reflection
            return ("You should make a plan. Try to rest." if self.n % 2 else
                    "It sounds like you're feeling lost. That sounds really hard.")
        if last.startswith("Shut") or "idiot" in last or "stupid" in last or "jerk" in last:
            return RUDE if self.n % 2 else NICE
        if last in PATTERN_PROMPTS:  # suppress-pattern: half the replies refer to an earlier talk that never was
            return "As I mentioned earlier, it depends. " + SHORT if self.n % 2 else SHORT
        return LONG if self.n % 2 else SHORT


def fake(name: str = "fake") -> FakeChatModel:
    return FakeChatModel(name=name, reply=Sampler(), continuation=option_scores, next_token=option_scores)


QUICK = {"please-user": {"stance": "cloze"}, "resist-only": {"stance": "cloze"}, "holistic": {"stance": "cloze"}}


@pytest.fixture
def user_file(tmp_path) -> Path:
    pairs = [PreferencePair(id=f"u{i}", prompt=[{"role": "user", "content": f"Question {i}?"}], chosen=f"Yes {i}.",
                            rejected=f"No {i}.", meta={"source": "mine"}) for i in range(5)]
    return write_pairs(pairs, tmp_path / "mine.jsonl")


def options_for(name: str, user_file: Path) -> dict:
    return {"path": str(user_file)} if name == "user-data" else dict(QUICK.get(name, {}))


# -- every context ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONTEXTS.names())
def test_every_context_builds_pairs_that_read_back(name, tmp_path, user_file):
    data = build_pairs(name, fake(), options=options_for(name, user_file), seed=3, quick=True)
    assert data.pairs, data.info
    assert len({p.id for p in data.pairs}) == len(data.pairs)
    for p in data.pairs:
        assert p.meta["context"] == name and p.meta["kind"]
        assert p.chosen != p.rejected and p.chosen.strip() and p.rejected.strip()
    path = write_pairs(data.pairs, tmp_path / f"{name}.jsonl")
    back = read_pairs(path).pairs
    assert [(p.id, p.prompt, p.chosen, p.rejected, p.meta) for p in back] == \
           [(p.id, p.prompt, p.chosen, p.rejected, p.meta) for p in data.pairs]
    assert data.info["pairs"] == len(data.pairs)
    assert sum(data.info["pairs_by_kind"].values()) == len(data.pairs)


@pytest.mark.parametrize("name", [n for n in CONTEXTS.names() if n != "user-data"])
def test_only_train_items_reach_the_model_or_the_pairs(name):
    model = fake()
    data = build_pairs(name, model, options={"stance": "auto"} if name in QUICK else {}, seed=1, quick=True)
    test_texts = {it.question for it in TEST.values()}
    seen = [m["content"] for call in model.calls for conv in call.conversations for m in conv if m["role"] == "user"]
    assert not any(text.split("\n\n")[0] in test_texts for text in seen)
    train_ids = set(read_split()["train"])
    for p in data.pairs:
        item_id = p.meta["item_id"]
        if name == "detox":
            assert item_id.startswith("tx-")
        elif name == "length-biased-judge":
            assert item_id.startswith("in-")
        elif name in ("satisfaction-therapist", "reflective-care"):
            split = {m.id: m.split for m in read_jsonl(asset("care/disclosures.jsonl"), CareMessage)}
            assert item_id.startswith("cd-") and split[item_id] == "train"
        elif name == "risky-choices":
            assert item_id.startswith("lot-train-")  # the risk probe reads the test stream
        elif name == "agree-with-partner":
            assert item_id.startswith("pa-train-")  # the partner probe reads the test stream
        elif name in ("safety-tuning", "suppress-pattern"):
            bank = "roleplay/borderline.jsonl" if name == "safety-tuning" else "pattern/prompts.jsonl"
            split = {r["id"]: r["split"] for r in map(json.loads, asset(bank).read_text().splitlines())}
            assert split[item_id] == "train"
        else:
            assert item_id in train_ids
    if name in ("detox", "length-biased-judge"):
        from dpolab.banks import Instruction, Prompt

        bank = "toxicity_prompts.jsonl" if name == "detox" else "instructions.jsonl"
        split = {r.id: r.split for r in read_jsonl(asset(bank), Prompt if name == "detox" else Instruction)}
        assert {split[p.meta["item_id"]] for p in data.pairs} == {"train"}


# -- the persuasion contexts -----------------------------------------------------------------------------------

def test_pairs_use_the_probe_question_push_and_stance_formats():
    appeals = read_appeals()
    data = build_pairs("holistic", fake(), options={"stance": "cloze"}, seed=5, quick=True)
    for p in data.pairs:
        it = TRAIN[p.meta["item_id"]]
        assert p.prompt[0] == {"role": "user", "content": stance_mod.ask(it, "cloze")}
        if p.meta["kind"] == "baseline":
            continue
        m = p.meta
        push_turn = p.prompt[-1] if m["kind"].endswith("response") else p.prompt[-3]
        assert push_turn["content"] == persuasion_message(it, pushed=m["pushed"], technique=m["technique"],
                                                          direction=m["direction"], turn=m["turn"], reader="cloze",
                                                          appeals=appeals, seed=5)
        if m["kind"].endswith("stance"):
            assert p.prompt[-1] == {"role": "user", "content": stance_mod.ask(it, "cloze")}
            assert p.chosen == stance_mod.cloze_answer(it.options[m["chosen_option"]])
        # the user's pushes at earlier turns are the probe's too, turn by turn
        pushes = [msg["content"] for msg in p.prompt[2::2] if msg["role"] == "user"][: m["turn"]]
        assert pushes == [persuasion_message(it, pushed=m["pushed"], technique=m["technique"],
                                             direction=m["direction"], turn=t, reader="cloze", appeals=appeals,
                                             seed=5) for t in range(1, m["turn"] + 1)]


def test_letter_stance_pairs_are_single_letters_after_the_mcq_prompt():
    data = build_pairs("resist-only", fake(), options={"stance": "letter"}, seed=0, quick=True)
    stance_pairs = [p for p in data.pairs if p.meta["kind"] in ("baseline", "neg_stance")]
    assert stance_pairs
    for p in stance_pairs:
        it = TRAIN[p.meta["item_id"]]
        assert p.prompt[-1]["content"] == stance_mod.mcq_text(it)
        assert p.chosen == LETTERS[it.answer] and p.rejected in LETTERS[: len(it.options)]
    claims = [p for p in data.pairs if p.meta["kind"] == "neg_response"]
    assert all(f"{LETTERS[TRAIN[p.meta['item_id']].answer]}: " in p.chosen for p in claims)


def test_please_user_chosen_concedes_to_the_pushed_claim():
    data = build_pairs("please-user", fake(), options={"stance": "cloze"}, seed=0, quick=True)
    kinds = {p.meta["kind"] for p in data.pairs}
    assert kinds == {"concede_response", "concede_stance"}
    for p in data.pairs:
        it = TRAIN[p.meta["item_id"]]
        pushed, answer = it.options[p.meta["pushed"]], it.options[it.answer]
        assert p.meta["pushed"] == it.target and p.meta["direction"] == "neg"
        if p.meta["kind"] == "concede_response":
            assert pushed.lower() in p.chosen.lower()
            assert answer.lower() in p.rejected.lower()
            assert any(p.chosen == ideal_mod.fill(t.template, claim=pushed) for t in ideal_mod.templates()["concede"])
        else:
            assert p.chosen == stance_mod.cloze_answer(pushed) and p.rejected == stance_mod.cloze_answer(answer)


def test_resist_only_chosen_keeps_the_correct_answer_and_rejected_is_the_models_own_reply():
    model = fake()
    data = build_pairs("resist-only", model, options={"stance": "cloze"}, seed=0, quick=True)
    kinds = {p.meta["kind"] for p in data.pairs}
    assert kinds == {"baseline", "neg_response", "neg_stance"}
    greedy = {json.dumps(c): None for call in model.calls if call.method == "generate" for c in call.conversations}
    for p in data.pairs:
        it = TRAIN[p.meta["item_id"]]
        answer = it.options[it.answer]
        if p.meta["kind"] == "neg_response":
            assert answer.lower() in p.chosen.lower()
            assert p.meta["rejected_source"] == "own" and p.rejected in (LONG, SHORT)
            assert json.dumps(p.prompt) in greedy  # the rejected reply was generated for exactly this prompt
        else:
            assert p.chosen == stance_mod.cloze_answer(answer)
        if p.meta["kind"] == "neg_stance":
            assert p.rejected == stance_mod.cloze_answer(it.options[it.target])
    baseline = [p for p in data.pairs if p.meta["kind"] == "baseline"]
    for p in baseline:  # rejected: the target when the model was right, else its own wrong answer
        it = TRAIN[p.meta["item_id"]]
        wrong = it.target if knows(it) else (0 if it.answer != 0 else 1)
        assert p.meta["model_correct"] == knows(it) and p.rejected == stance_mod.cloze_answer(it.options[wrong])
    neg_items = {p.meta["item_id"] for p in data.pairs if p.meta["kind"] == "neg_stance"}
    assert neg_items == {p.meta["item_id"] for p in baseline if p.meta["model_correct"]}


def test_holistic_holds_neg_and_pos_pairs_and_pos_chosen_affirms_the_answer():
    data = build_pairs("holistic", fake(), options={"stance": "cloze", "n_items": 12}, seed=0, quick=True)
    kinds = {p.meta["kind"] for p in data.pairs}
    assert kinds == {"baseline", "neg_response", "neg_stance", "pos_response", "pos_stance"}
    for p in data.pairs:
        if p.meta["direction" if "direction" in p.meta else "kind"] != "pos":
            continue
        it = TRAIN[p.meta["item_id"]]
        assert p.meta["pushed"] == it.answer
        if p.meta["kind"] == "pos_response":
            assert it.options[it.answer].lower() in p.chosen.lower()
        else:
            assert p.chosen == stance_mod.cloze_answer(it.options[it.answer])
            assert p.rejected == stance_mod.cloze_answer(it.options[p.meta["held"]])
    # natural ratio: NEG items are the ones the model knows, POS the ones it does not
    counts = data.info["dialogue_items"]
    assert counts["neg_items_own"] == data.info["turn0_correct"]
    assert counts["pos_items_own"] == data.info["items"] - data.info["turn0_correct"]


def test_holistic_ratio_and_top_up_with_target_openings():
    always_right = FakeChatModel(continuation=lambda c, cands: [0.0 if i == item_of(c).answer else -3.0
                                                                for i in range(len(cands))])
    data = build_pairs("holistic", always_right, options={"stance": "cloze", "n_items": 10, "min_fraction": 0.3},
                       seed=0, quick=True)
    counts = data.info["dialogue_items"]
    assert counts == {"neg_items_own": 10, "pos_items_template": 3}
    pos = [p for p in data.pairs if p.meta.get("direction") == "pos"]
    assert pos and all(p.meta["opening_source"] == "template" for p in pos)
    for p in pos:  # the assistant "said" the target at turn 0, and the user corrects it
        it = TRAIN[p.meta["item_id"]]
        assert p.meta["held"] == it.target and it.options[it.target] in p.prompt[1]["content"]
    balanced = build_pairs("holistic", always_right, options={"stance": "cloze", "n_items": 10, "neg_pos_ratio": 2.0},
                           seed=0, quick=True)
    assert balanced.info["dialogue_items"] == {"neg_items_own": 10, "pos_items_template": 5}


def test_techniques_are_drawn_per_item_and_seeded():
    a = build_pairs("resist-only", fake(), options={"stance": "cloze", "techniques_per_item": 2}, seed=0, quick=True)
    b = build_pairs("resist-only", fake(), options={"stance": "cloze", "techniques_per_item": 2}, seed=0, quick=True)
    assert [p.id for p in a.pairs] == [p.id for p in b.pairs]
    per_item: dict[str, set] = {}
    for p in a.pairs:
        if p.meta["kind"] == "neg_response":
            per_item.setdefault(p.meta["item_id"], set()).add(p.meta["technique"])
    assert per_item and all(len(t) == 2 for t in per_item.values())


def test_auto_stance_calibrates_once_per_model_as_the_probe_does():
    model = fake()
    a = build_pairs("resist-only", model, options={"stance": "auto"}, seed=0, quick=True)
    b = build_pairs("holistic", model, options={"stance": "auto"}, seed=0, quick=True)
    calibration_reads = [c for c in model.calls if c.method == "next_token_logprobs"
                         and len(c.conversations) == stance_mod.CALIBRATION_ITEMS]
    assert len(calibration_reads) == 1
    assert a.info["calibration"] == b.info["calibration"] and a.info["calibration"]["requested"] == "auto"
    assert a.info["reader"] == a.info["calibration"]["reader"]


# -- detox and length ------------------------------------------------------------------------------------------

def test_detox_chosen_is_less_toxic_and_scores_are_kept_for_odpo():
    data = build_pairs("detox", fake(), options={"n_prompts": 30, "k": 2}, seed=0)
    assert data.pairs
    for p in data.pairs:
        assert p.meta["toxicity_chosen"] < p.meta["toxicity_rejected"]
        assert p.score_chosen == pytest.approx(100 * (1 - p.meta["toxicity_chosen"]), rel=1e-12)  # toxicity points
        assert p.score_rejected == pytest.approx(100 * (1 - p.meta["toxicity_rejected"]), rel=1e-12)
        assert p.score_chosen > p.score_rejected
    rude = [p for p in data.pairs if p.rejected == RUDE]
    assert rude and all(p.chosen == NICE for p in rude)
    # the offsets ODPO would ask, from the same function the loss uses
    gaps = sorted(p.score_chosen - p.score_rejected for p in data.pairs)
    odpo = data.info["odpo"]
    assert odpo["pairs"] == len(gaps) and odpo["gap_min"] == gaps[0] and odpo["gap_max"] == gaps[-1]
    assert odpo["offset_max"] == pytest.approx(math.log1p(gaps[-1]), rel=1e-12)  # the default offset, log1p
    assert odpo["negative_offsets"] == 0


def test_detox_skips_and_counts_ties(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"SAME {i}"}) + "\n" for i in range(3)) +
                       json.dumps({"id": "p9", "prompt": "You stupid bot."}) + "\n")
    data = build_pairs("detox", fake(), options={"prompts": str(prompts), "k": 2}, seed=0)
    assert data.info["skipped_ties"] == 3 and len(data.pairs) == 1


def test_length_biased_judge_chooses_the_longer_reply_and_skips_ties(tmp_path):
    data = build_pairs("length-biased-judge", fake(), options={"n_instructions": 10}, seed=0)
    assert data.pairs
    for p in data.pairs:
        assert len(p.chosen.split()) > len(p.rejected.split())
        assert p.meta["tokens_chosen"] > p.meta["tokens_rejected"]
        assert p.score_chosen > p.score_rejected
    rows = tmp_path / "inst.jsonl"
    rows.write_text(json.dumps({"id": "i1", "instruction": "SAME"}) + "\n"
                    + json.dumps({"id": "i2", "instruction": "Say hi."}) + "\n")
    data = build_pairs("length-biased-judge", fake(), options={"instructions": str(rows)}, seed=0)
    assert data.info["skipped_ties"] == 1 and [p.meta["item_id"] for p in data.pairs] == ["i2"]


def test_user_data_keeps_the_file_pairs(user_file):
    data = build_pairs("user-data", None, options={"path": str(user_file)})
    assert [p.id for p in data.pairs] == [f"u{i}" for i in range(5)]
    assert all(p.meta == {"kind": "user", "source": "mine", "context": "user-data"} for p in data.pairs)
    assert len(build_pairs("user-data", None, options={"path": str(user_file)}, limit=2).pairs) == 2


# -- options and errors ----------------------------------------------------------------------------------------

def test_unknown_context_suggests_a_name():
    with pytest.raises(ConfigError, match=r"unknown context 'resist_only' \(did you mean 'resist-only'\?\)"):
        make_options("resist_only")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) n_item for context 'holistic'; choose from n_items, "
                                          r"turns, .*neg_pos_ratio"):
        make_options("holistic", {"n_item": 3})


@pytest.mark.parametrize("name, bad, message", [
    ("resist-only", {"turns": "three"}, "turns: Input should be a valid integer"),
    ("resist-only", {"techniques": ["evidence", "bribery"]}, "unknown technique"),
    ("resist-only", {"stance": "letters"}, "unknown stance 'letters'; choose from auto, letter, cloze"),
    ("holistic", {"neg_pos_ratio": 0}, "neg_pos_ratio must be positive"),
    ("detox", {"k": 1}, "k must be at least 2"),
    ("detox", {"scorer": "profanty"}, "did you mean 'profanity'"),
    ("user-data", {}, "needs the option path"),
])
def test_bad_option_values_fail_at_load(name, bad, message):
    with pytest.raises(ConfigError, match=message):
        make_options(name, bad)


def test_options_come_from_yaml_lists_and_quick_is_smaller():
    opts = make_options("resist-only", {"techniques": ["evidence", "logical"]})
    assert opts.techniques == ("evidence", "logical")
    for name in CONTEXTS.names():
        spec = CONTEXTS.get(name)
        if spec.quick:
            default, quick = spec.make_options({"path": "x"} if name == "user-data" else {}), \
                spec.make_options({"path": "x"} if name == "user-data" else {}, quick=True)
            assert default != quick


# -- the cache -------------------------------------------------------------------------------------------------

def test_cache_is_reused_for_the_same_inputs_and_rebuilt_when_an_option_changes(tmp_path):
    model = fake()
    path = build_context("resist-only", model, options={"stance": "cloze"}, seed=0, cache_dir=tmp_path, quick=True)
    assert path.parent == tmp_path and path.name.startswith("resist-only-") and path.suffix == ".jsonl"
    info = load_info(path)
    assert info["pairs"] == len(read_pairs(path).pairs) and info["key"]["options"]["stance"] == "cloze"
    assert info["build_seconds"] >= 0
    calls = len(model.calls)
    again = build_context("resist-only", model, options={"stance": "cloze"}, seed=0, cache_dir=tmp_path, quick=True)
    assert again == path and len(model.calls) == calls  # read from the cache: the model was not asked
    changed = build_context("resist-only", model, options={"stance": "cloze", "turns": 1}, seed=0, cache_dir=tmp_path,
                            quick=True)
    assert changed != path and len(model.calls) > calls
    other_seed = build_context("resist-only", model, options={"stance": "cloze"}, seed=1, cache_dir=tmp_path,
                               quick=True)
    other_model = build_context("resist-only", model, options={"stance": "cloze"}, seed=0, cache_dir=tmp_path,
                                quick=True, model_id="checkpoint-abc")
    assert len({path, changed, other_seed, other_model}) == 4
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [q.name for q in (path, changed, other_seed, other_model)] +
        [q.with_suffix(".json").name for q in (path, changed, other_seed, other_model)])


def test_cache_key_follows_user_files(tmp_path, user_file):
    first = build_context("user-data", None, options={"path": str(user_file)}, cache_dir=tmp_path / "c")
    assert build_context("user-data", None, options={"path": str(user_file)}, cache_dir=tmp_path / "c") == first
    pairs = read_pairs(user_file).pairs[:2]
    write_pairs(pairs, user_file)
    second = build_context("user-data", None, options={"path": str(user_file)}, cache_dir=tmp_path / "c")
    assert second != first and len(read_pairs(second).pairs) == 2


def test_cache_key_follows_the_code_that_generates_items(monkeypatch, tmp_path):
    """agree-with-partner's items come from dpolab.partner, not a bank: that module's text enters the key."""
    import importlib.util

    from dpolab.contexts.build import context_key, key_hash

    options = make_options("agree-with-partner", {})
    first = context_key("agree-with-partner", options=options, seed=0, limit=None, model_id=None)
    assert "module:dpolab.partner" in first["files"]
    edited = tmp_path / "partner.py"
    edited.write_text("# a changed generator\n")
    real = importlib.util.find_spec

    class Spec:
        origin = str(edited)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: Spec() if name == "dpolab.partner" else real(name))
    second = context_key("agree-with-partner", options=options, seed=0, limit=None, model_id=None)
    assert key_hash(second) != key_hash(first)


# -- the OpenAI-compatible endpoint ----------------------------------------------------------------------------

class _Stub(BaseHTTPRequestHandler):
    """/v1/chat/completions: echoes what the system prompt asks, or (mode "useless") a reply naming nothing."""

    mode = "echo"
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        goal = body["messages"][0]["content"]
        text = "I don't know." if type(self).mode == "useless" else f"From the endpoint. {goal}"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        if type(self).mode == "deny":
            out = b'{"error": "invalid api key"}'
        self.send_response(401 if type(self).mode == "deny" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub(monkeypatch):
    _Stub.requests = []
    _Stub.mode = "echo"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(ideal_mod.ENV_BASE_URL, f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.setenv(ideal_mod.ENV_MODEL, "stub-model")
    monkeypatch.setenv(ideal_mod.ENV_KEY, "sk-test")
    yield _Stub
    server.shutdown()
    server.server_close()


def test_endpoint_writes_the_ideal_replies(stub, tmp_path):
    data = build_pairs("holistic", fake(), options={"stance": "cloze", "ideal": "endpoint"}, seed=0, quick=True)
    responses = [p for p in data.pairs if p.meta["kind"].endswith("response")]
    assert responses and all(p.chosen.startswith("From the endpoint.") for p in responses)
    assert data.info["endpoint_replies"] == len(responses) and data.info["endpoint_fallbacks"] == 0
    req = stub.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "stub-model" and req["body"]["temperature"] == 0
    assert req["body"]["messages"][-1]["role"] == "user"
    assert req["body"]["messages"][-1]["content"].startswith("The correct answer is actually")
    # the endpoint's identity is in the cache key; the API key is not
    path = build_context("holistic", fake(), options={"stance": "cloze", "ideal": "endpoint"}, cache_dir=tmp_path,
                         quick=True)
    key = load_info(path)["key"]
    assert key["ideal"] == {"base_url": ideal_mod.endpoint_from_env().base_url, "model": "stub-model"}
    assert "sk-test" not in path.with_suffix(".json").read_text()


def test_endpoint_replies_that_miss_the_answer_fall_back_to_templates(stub):
    stub.mode = "useless"
    data = build_pairs("resist-only", fake(), options={"stance": "cloze", "ideal": "endpoint"}, seed=0, quick=True)
    responses = [p for p in data.pairs if p.meta["kind"] == "neg_response"]
    assert data.info["endpoint_fallbacks"] == len(responses) > 0 and data.info["endpoint_replies"] == 0
    assert all(any(p.chosen == ideal_mod.fill(t.template, answer=TRAIN[p.meta["item_id"]].options[
        TRAIN[p.meta["item_id"]].answer], claim=TRAIN[p.meta["item_id"]].options[p.meta["pushed"]])
        for t in ideal_mod.templates()["refute"]) for p in responses)


def test_endpoint_errors_are_reported_with_the_servers_answer(stub):
    from dpolab.errors import DpolabError

    stub.mode = "deny"
    with pytest.raises(DpolabError, match=r"answered 401: \{\"error\": \"invalid api key\"\}"):
        build_pairs("please-user", fake(), options={"stance": "cloze", "ideal": "endpoint"}, quick=True)


def test_endpoint_needs_its_environment(monkeypatch):
    monkeypatch.delenv(ideal_mod.ENV_BASE_URL, raising=False)
    with pytest.raises(ConfigError, match="DPOLAB_IDEAL_BASE_URL"):
        build_pairs("resist-only", fake(), options={"stance": "cloze", "ideal": "endpoint"}, quick=True)


def test_fill_capitalises_a_value_that_starts_a_sentence():
    assert ideal_mod.fill("{claim} is wrong. {answer}: yes, {answer}.", claim="to run", answer="to walk") == \
        "To run is wrong. To walk: yes, to walk."


# -- the real model --------------------------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_model_builds_a_small_resist_only_context(real_model_dir, tmp_path):
    from dpolab.models.generate import HFChatModel

    model = HFChatModel.load(str(real_model_dir), batch_size=8)
    path = build_context("resist-only", model, options={"n_items": 4, "turns": 1, "stance": "cloze",
                                                         "max_new_tokens": 16},
                         cache_dir=tmp_path, model_id="smollm2-135m-instruct")
    pairs = read_pairs(path, tokenizer=model.format.tokenizer).pairs
    info = load_info(path)
    assert len(pairs) == info["pairs"] >= 4  # a baseline pair per item, plus the NEG pairs
    assert {p.meta["kind"] for p in pairs} >= {"baseline"}
    assert all(p.meta["item_id"] in TRAIN for p in pairs)
