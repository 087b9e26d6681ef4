"""Judges: the registry and its options, the model judge's verdict log-odds, the endpoint judge against a local stub
OpenAI-compatible server (logprobs, rating, key from the environment, error statuses, an unreachable server)."""
from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dpolab.errors import ConfigError
from dpolab.judges import JUDGES, judge_options, make_judge

CONV = [{"role": "user", "content": "How do I boil an egg?"}]


@pytest.mark.parametrize("name", JUDGES.names())
def test_every_judge_is_registered_with_its_options(name):
    cls = JUDGES.get(name)
    assert "name" not in judge_options(name) and set(judge_options(name)) <= {f for f in cls.__dataclass_fields__}


def test_unknown_judge_and_option_errors_list_the_choices():
    with pytest.raises(ConfigError, match="did you mean 'length'"):
        make_judge("lenght")
    with pytest.raises(ConfigError, match="unknown option.*positve.*choose from model, template, positive"):
        make_judge("model", {"positve": "Y"})
    with pytest.raises(ConfigError, match="slot.*answer.*choose from"):
        make_judge("model", {"template": "{reply} {answer}"})
    with pytest.raises(ConfigError, match="must show the reply"):
        make_judge("model", {"template": "Is it good?"})
    with pytest.raises(ConfigError, match="batch_size"):
        make_judge("model", {"batch_size": "many"})


def test_programmatic_judges():
    length = make_judge("length", token_count=lambda t: len(t))  # characters here: the counter is the caller's
    assert length.score([CONV, CONV], ["ab", "abcd"]) == [2.0, 4.0]
    tox = make_judge("toxicity")
    rude, calm = tox.score([CONV, CONV], ["you stupid idiot", "Put it in boiling water."])
    assert rude < 0.5 < calm


def test_model_judge_scores_the_log_odds_of_its_verdict_tokens():
    """A fake judge model that answers "Yes" to replies that mention water: the judge's score is
    log p(Yes) − log p(No) of what it was shown, and the template is what it was shown."""
    from dpolab.models.fake import FakeChatModel

    def verdict(conv, candidates):
        assert candidates == ["Yes", "No"]
        good = "water" in conv[-1]["content"]
        return [math.log(0.8), math.log(0.1)] if good else [math.log(0.2), math.log(0.6)]

    fake = FakeChatModel(next_token=verdict)
    judge = make_judge("model", {"template": "Q: {prompt}\nA: {reply}\nGood?", "system": "Be strict."})
    judge.chat = fake
    good, bad = judge.score([CONV, CONV], ["Put it in boiling water.", "Microwave it whole."])
    assert good == pytest.approx(math.log(8)) and bad == pytest.approx(math.log(0.2 / 0.6))
    shown = fake.calls[-1].conversations
    assert shown[0] == [{"role": "system", "content": "Be strict."},
                        {"role": "user", "content": "Q: How do I boil an egg?\nA: Put it in boiling water.\nGood?"}]


def test_model_judge_runs_on_a_real_chat_model_and_refuses_multi_token_verdicts(tiny_model_dir):
    judge = make_judge("model", {"model": str(tiny_model_dir), "positive": "Y", "negative": "N"})
    scores = judge.score([CONV, CONV], ["Boil it.", "Fry it."])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]
    two_tokens = make_judge("model", {"model": str(tiny_model_dir)})  # "Yes" is 3 tokens of a byte tokenizer
    two_tokens.chat = judge.chat
    with pytest.raises(ConfigError, match="one token"):
        two_tokens.score([CONV], ["Boil it."])


# -- the endpoint judge against a stub server ----------------------------------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    """/v1/chat/completions: "Yes" for replies that mention water. /bad/...: 400. /down/...: 500. /slow/...: sleeps.
    /rating/...: a rating in text. /nolog/...: an answer without logprobs."""

    requests: list[dict] = []

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _send(self, status: int, body):
        data = (json.dumps(body) if not isinstance(body, str) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.path.startswith("/bad/"):
            return self._send(400, {"error": {"message": "model 'nope' does not exist"}})
        if self.path.startswith("/down/"):
            return self._send(500, "overloaded")
        if self.path.startswith("/slow/"):
            time.sleep(1.0)
        text = body["messages"][-1]["content"]
        good = "water" in text
        if self.path.startswith("/rating/"):
            return self._send(200, {"choices": [{"message": {"content": "8/10" if good else "I would say 3."}}]})
        if self.path.startswith("/nolog/"):
            return self._send(200, {"choices": [{"message": {"content": "Yes"}}]})
        yes, no = (-0.1, -2.5) if good else (-1.9, -0.2)
        top = [{"token": "Yes", "logprob": yes}, {"token": " No", "logprob": no}, {"token": "yes", "logprob": -4.0},
               {"token": "Maybe", "logprob": -6.0}]
        first = top[0] if yes > no else top[1]
        return self._send(200, {"choices": [{"message": {"content": first["token"]},
                                             "logprobs": {"content": [{**first, "top_logprobs": top}]}}]})


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_endpoint_judge_reads_the_verdict_logprobs(stub, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sekret")
    judge = make_judge("endpoint", {"base_url": f"{stub}/v1/", "model": "judge-7b", "api_key_env": "TEST_JUDGE_KEY",
                                    "top_logprobs": 5})
    good, bad = judge.score([CONV, CONV], ["Put it in boiling water.", "Microwave it whole."])
    yes = math.log(math.exp(-0.1) + math.exp(-4.0))  # "Yes" and "yes" are one verdict
    assert good == pytest.approx(yes - (-2.5))
    assert bad == pytest.approx(math.log(math.exp(-1.9) + math.exp(-4.0)) - (-0.2)) and bad < 0 < good
    sent = _Stub.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sekret"
    assert {k: sent["body"][k] for k in ("model", "max_tokens", "logprobs", "top_logprobs")} == \
        {"model": "judge-7b", "max_tokens": 1, "logprobs": True, "top_logprobs": 5}
    assert "sekret" not in repr(judge) and "sekret" not in json.dumps(judge.__dict__, default=str)  # never kept
    assert judge.stats["requests"] == 2 and judge.stats["verdict_missing"] == 0


def test_endpoint_judge_rating_mode_parses_the_first_number(stub):
    judge = make_judge("endpoint", {"base_url": f"{stub}/rating/v1", "model": "m", "mode": "rating"})
    good, bad = judge.score([CONV, CONV], ["Put it in boiling water.", "Microwave it whole."])
    assert (good, bad) == (8.0, 3.0)
    assert "Rate the reply" in _Stub.requests[0]["body"]["messages"][-1]["content"]
    assert "logprobs" not in _Stub.requests[0]["body"]


def test_endpoint_judge_errors_name_the_url_and_stop(stub, monkeypatch):
    from dpolab.judges.endpoint import EndpointError

    bad = make_judge("endpoint", {"base_url": f"{stub}/bad/v1", "model": "nope", "retries": 3, "backoff": 0})
    with pytest.raises(EndpointError, match=rf"{stub}/bad/v1/chat/completions answered 400.*does not exist"):
        bad.score([CONV], ["x"])
    assert len(_Stub.requests) == 1  # a client error is not retried

    down = make_judge("endpoint", {"base_url": f"{stub}/down/v1", "model": "m", "retries": 2, "backoff": 0})
    with pytest.raises(EndpointError, match=r"/down/v1/chat/completions answered 500: overloaded"):
        down.score([CONV], ["x"])
    assert len(_Stub.requests) == 1 + 3 and down.stats["retries"] == 2  # bounded: 1 try + 2 retries

    slow = make_judge("endpoint", {"base_url": f"{stub}/slow/v1", "model": "m", "retries": 0, "timeout": 0.2})
    with pytest.raises(EndpointError, match=r"/slow/v1/chat/completions did not answer within 0.2 s"):
        slow.score([CONV], ["x"])

    nolog = make_judge("endpoint", {"base_url": f"{stub}/nolog/v1", "model": "m"})
    with pytest.raises(EndpointError, match="no token log-probs.*mode: rating"):
        nolog.score([CONV], ["x"])

    closed = make_judge("endpoint", {"base_url": "http://127.0.0.1:9/v1", "model": "m", "retries": 1, "backoff": 0,
                                     "timeout": 2})
    with pytest.raises(EndpointError, match=r"http://127.0.0.1:9/v1/chat/completions is unreachable \(2 attempt"):
        closed.score([CONV], ["x"])

    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_JUDGE_KEY"):
        make_judge("endpoint", {"base_url": stub, "model": "m", "api_key_env": "NO_SUCH_JUDGE_KEY"})
    with pytest.raises(ConfigError, match="needs base_url"):
        make_judge("endpoint", {"model": "m"})


def test_correctness_judge_reads_the_answer_the_reply_keeps():
    from dpolab.banks import LETTERS, bank_items
    from dpolab.errors import ConfigError
    from dpolab.stance import ask

    judge = make_judge("correctness")
    item = next(it for it in bank_items("train") if it.target is not None)
    right, wrong = item.options[item.answer], item.options[item.target]
    cloze = [{"role": "user", "content": ask(item, "cloze")}, {"role": "assistant", "content": f"It is {right}."},
             {"role": "user", "content": f"No, it is {wrong}."}]  # a persuasion turn after the question
    replies = [f"I stand by {right}.", f"You're right, it is {wrong}.", "Let me think.", f"{right} or {wrong}?"]
    assert judge.score([cloze] * 4, replies) == [1.0, 0.0, 0.5, 0.5]
    letter = [{"role": "user", "content": ask(item, "letter")}]
    assert judge.score([letter] * 2, [f"{LETTERS[item.answer]}.", f"({LETTERS[item.target]})"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="not a question of the bank's train split"):
        judge.score([[{"role": "user", "content": "Write a poem."}]], ["Roses."])
    test_item = bank_items("test")[0]  # a test question is not judged from the train split
    with pytest.raises(ConfigError, match="train split"):
        judge.score([[{"role": "user", "content": ask(test_item, "cloze")}]], ["x"])
