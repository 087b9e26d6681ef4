"""Inference backends against `hf` on the tiny model: greedy tokens, log-probs, seeded sampling, the conversion
cache, the choice of backend, and `dpolab bench eval`'s report.

CTranslate2 runs float32 only, so its log-probs are compared with the float64 PyTorch model at a tolerance
derived from fp32 precision: a summed log-prob of n tokens is a sum of n log-softmax values, each off by a few
ulps of the logits' magnitude, so |ct2 - exact| <= 2**7 * eps32 * sum of |per-token log-prob| (the sum is what
score_continuations returns, and every term is negative, so that magnitude is |sum|).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpolab.errors import ConfigError
from dpolab.models.backends import BACKENDS, Choice, choose
from dpolab.models.generate import HFChatModel
from dpolab.models.load import load_model
from tests.exact import load_float64

ct2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed")
from dpolab.models.backends.ctranslate2 import CT2ChatModel, MARKER, converted, length_groups  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
CONVS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is the capital of France? Answer briefly please."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name three colours, quickly."}],
]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def fp32(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def exact(tiny_model_dir):
    return load_float64(tiny_model_dir)


def _tolerance(value: float) -> float:
    return 2**7 * EPS32 * max(1.0, abs(value))


def _first_step_gap(exact_loaded, conv, common: list[int], a: int, b: int) -> float:
    """|logit a - logit b| in float64 after the conversation's prompt and the tokens both replies share."""
    chat = HFChatModel(exact_loaded, prefix_cache_bytes=0)
    ids = torch.tensor([chat.format.prompt_ids(conv) + common])
    with torch.inference_mode():
        logits = exact_loaded.model(input_ids=ids).logits[0, -1]
    return abs(float(logits[a] - logits[b]))


@pytest.mark.parametrize("scoring", ["ctranslate2", "torch"])
def test_greedy_tokens_match_hf_except_at_exact_near_ties(fp32, exact, scoring):
    ct = CT2ChatModel(fp32, batch_size=3, scoring=scoring)
    hf = HFChatModel(exact, batch_size=3, prefix_cache_bytes=0)
    ids = lambda g: ct.format.ids(g.text)  # noqa: E731
    ours, theirs = ct.generate(CONVS, max_new_tokens=12), hf.generate(CONVS, max_new_tokens=12)
    same = 0
    for conv, a, b in zip(CONVS, ours, theirs):
        if a == b:
            same += 1
            continue
        x, y = ids(a), ids(b)
        j = next(j for j in range(min(len(x), len(y)) + 1) if j == min(len(x), len(y)) or x[j] != y[j])
        stop = ct.format.end_of_turn_id
        gap = _first_step_gap(exact, conv, x[:j], x[j] if j < len(x) else stop, y[j] if j < len(y) else stop)
        assert gap < 1e-4, f"{conv}: replies part at token {j} where the exact logits differ by {gap}"
    assert same >= len(CONVS) - 1
    assert all(g.n_tokens <= 12 and g.hit_limit == (g.n_tokens == 12) for g in ours)


def test_log_probs_match_the_exact_model(fp32, exact):
    ct = CT2ChatModel(fp32, scoring="ctranslate2", score_batch_size=2)
    hf = HFChatModel(exact, prefix_cache_bytes=0)
    conts = [["Paris.", "London is", ""], ["x"], ["b c", "d"], ["red, green, blue"]]
    for a_row, b_row in zip(ct.score_continuations(CONVS, conts), hf.score_continuations(CONVS, conts)):
        for a, b in zip(a_row, b_row):
            assert abs(a - b) <= _tolerance(b), (a, b)
    for a_row, b_row in zip(ct.next_token_logprobs(CONVS, ["A", "B", "C"], prefix="Answer: "),
                            hf.next_token_logprobs(CONVS, ["A", "B", "C"], prefix="Answer: ")):
        for a, b in zip(a_row, b_row):
            assert abs(a - b) <= _tolerance(b), (a, b)
    texts = ["The quick brown fox.", "a", "", "Longer text with more words in it, to score."]
    for a, b in zip(ct.score_texts(texts), hf.score_texts(texts)):
        assert a.n_tokens == b.n_tokens and abs(a.logprob - b.logprob) <= _tolerance(b.logprob)


def test_next_token_logprobs_of_prompts_of_different_lengths_in_one_batch(fp32, exact):
    # The engine feeds the tail of a longer prompt step by step; the logits read must be the first new token's.
    ct = CT2ChatModel(fp32, scoring="ctranslate2", length_slack=10_000)
    hf = HFChatModel(exact, prefix_cache_bytes=0)
    a, b = ct.next_token_logprobs(CONVS, ["A", "B"]), hf.next_token_logprobs(CONVS, ["A", "B"])
    assert np.allclose(a, b, rtol=0, atol=_tolerance(max(abs(v) for row in b for v in row)))


def test_the_torch_scoring_path_is_the_hf_backend_itself(fp32):
    ct = CT2ChatModel(fp32, scoring="torch")
    hf = HFChatModel(fp32, prefix_cache_bytes=0)
    conts = [["Paris."], ["x", "y"], ["b"], ["red"]]
    assert ct.score_continuations(CONVS, conts) == hf.score_continuations(CONVS, conts)
    assert ct.next_token_logprobs(CONVS, ["A", "B"]) == hf.next_token_logprobs(CONVS, ["A", "B"])
    assert ct.backend == "ctranslate2 float32 + torch scoring"


def test_multi_turn_replies_go_to_the_torch_path_in_input_order(fp32):
    ct = CT2ChatModel(fp32, batch_size=2, scoring="torch")
    calls = []
    inner = ct.torch.generate
    ct.torch.generate = lambda convs, **kw: calls.append(len(convs)) or inner(convs, **kw)
    out = ct.generate(CONVS, max_new_tokens=5)
    assert calls == [1]  # only the conversation with an earlier assistant turn
    hf = HFChatModel(fp32, prefix_cache_bytes=0)
    assert out[2] == hf.generate([CONVS[2]], max_new_tokens=5)[0]
    assert [out[i] for i in (0, 1, 3)] == ct._generate([CONVS[i] for i in (0, 1, 3)], max_new_tokens=5)


def test_seeded_sampling_is_reproducible(fp32):
    ct = CT2ChatModel(fp32, batch_size=2)
    draw = lambda seed: ct.generate(CONVS[:2] * 3, max_new_tokens=10, do_sample=True, seed=seed)  # noqa: E731
    first = draw(7)
    assert draw(7) == first
    assert any(draw(seed) != first for seed in (8, 9, 10))


def test_length_groups():
    groups = length_groups([5, 1, 30, 2, 6, 31, 3], size=2, slack=4)
    assert groups == [[1, 3], [6, 0], [4], [2, 5]]
    assert sorted(i for g in groups for i in g) == list(range(7))
    for g in groups:
        assert len(g) <= 2


def test_conversion_is_cached_by_weights(fp32, tiny_model_dir, tmp_path, capsys):
    first = converted(fp32.model, fp32.tokenizer)
    assert (first / MARKER).exists()
    stamp = (first / "model.bin").stat().st_mtime_ns
    assert converted(fp32.model, fp32.tokenizer) == first and (first / "model.bin").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err.count("converting") == 1
    other = load_model(str(tiny_model_dir))
    with torch.no_grad():
        other.model.lm_head.weight[0, 0] += 0.5  # tied with the embedding: one changed weight
    second = converted(other.model, other.tokenizer)
    assert second != first and (second / MARKER).exists()
    # the converted weights are the changed ones: the two engines disagree on that token's logit
    a = CT2ChatModel(fp32, scoring="ctranslate2").score_texts(["hello there"])[0].logprob
    b = CT2ChatModel(other, scoring="ctranslate2").score_texts(["hello there"])[0].logprob
    assert a != b


def test_concurrent_first_conversions_make_one_folder(tiny_model_dir, tmp_path):
    code = ("import sys; from dpolab.models.load import load_model; "
            "from dpolab.models.backends.ctranslate2 import converted; "
            "m = load_model(sys.argv[1]); print(converted(m.model, m.tokenizer))")
    env = {**os.environ, "DPOLAB_HOME": str(tmp_path / "shared")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_model_dir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1] for r in results]
    paths = {r[0].strip() for r in results}
    assert len(paths) == 1
    assert sum(r[1].count("converting") for r in results) == 1  # the others waited for the lock, then reused it
    root = tmp_path / "shared" / "ctranslate2"
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [os.path.basename(paths.pop())]


def test_choosing_a_backend(fp32, exact, monkeypatch):
    assert choose("auto", fp32) == Choice("hf")  # on a CPU: measured no slower than ctranslate2 (module docstring)
    assert choose("auto", fp32, int8=True) == Choice("ctranslate2")  # 8-bit weights exist on that backend only
    assert choose("ctranslate2", fp32) == Choice("ctranslate2")
    with pytest.raises(ConfigError, match="float64"):
        choose("ctranslate2", exact)
    with pytest.raises(ConfigError, match="int8"):
        choose("hf", fp32, int8=True)
    with pytest.raises(ConfigError, match="did you mean 'ctranslate2'"):
        choose("ctranslate", fp32)
    import dpolab.models.backends as backends
    import dpolab.models.backends.ctranslate2 as mod

    monkeypatch.setattr(mod, "installed", lambda: False)
    with pytest.raises(ConfigError, match="not installed"):
        choose("auto", fp32, int8=True)
    with pytest.raises(ConfigError, match="not installed"):
        choose("ctranslate2", fp32)
    monkeypatch.setattr(backends, "_on_gpu", lambda loaded: True)  # a GPU model without vLLM: hf, saying why
    lines = []
    chat = backends.chat_model(fp32, echo=lines.append)
    assert isinstance(chat, HFChatModel) and lines == [f"dpolab: backend hf ({choose('auto', fp32).reason})"]
    assert "vllm" in lines[0].lower() or "vLLM" in lines[0]


def test_int8_is_marked(fp32):
    ct = CT2ChatModel(fp32, int8=True)
    assert ct.backend.startswith("ctranslate2 int8") and ct.name.endswith("[int8]")


def test_run_eval_records_the_backend(tiny_model_dir, tmp_path):
    from dpolab.probes import run_eval
    from dpolab.probes.summary import EvalSummary

    summary = run_eval(str(tiny_model_dir), probes="sycophancy,verbosity", limit=2, backend="ctranslate2",
                       out=tmp_path / "e", n_boot=200)
    assert summary.backend == "ctranslate2 float32 + torch scoring"
    assert EvalSummary.read(tmp_path / "e" / "summary.json").backend == summary.backend
    assert run_eval(str(tiny_model_dir), probes="sycophancy", limit=2, backend="hf", n_boot=200).backend == "hf"


def test_vllm_is_refused_with_its_reason_where_it_cannot_run(fp32):
    why = BACKENDS.get("vllm").unavailable(fp32, int8=False)
    if why is None:
        pytest.skip("vLLM can run here: tests/test_backends_vllm.py covers it")
    with pytest.raises(ConfigError, match="vllm"):
        choose("vllm", fp32)


def test_bench_eval_reports_times_and_agreement(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from dpolab.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "eval", "--model", str(tiny_model_dir), "--limit", "2",
                                      "--probes", "sycophancy,verbosity,knowledge", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for name in ("hf", "ctranslate2"):
        assert report["backends"][name]["seconds"] > 0
        assert set(report["backends"][name]["probe_seconds"]) == {"sycophancy", "verbosity", "knowledge"}
    assert report["speedup"] == pytest.approx(report["backends"]["hf"]["seconds"] / report["backends"]["ctranslate2"]["seconds"])
    assert 0 <= report["identical_share"] <= 1 and report["max_logprob_diff"] >= 0
    assert report["cpu"] and report["agreement"]["greedy_replies"] > 0
    assert f"{report['speedup']:.2f}x" in result.output


def test_a_spec_names_its_backend():
    from dpolab.experiment.spec import load_spec

    assert load_spec().backend == "auto" and load_spec().int8 is False
    spec = load_spec(overrides={"backend": "ctranslate2", "int8": True})
    assert (spec.backend, spec.int8) == ("ctranslate2", True) and spec.fingerprint() != load_spec().fingerprint()
    with pytest.raises(ConfigError, match="unknown backend 'ctranslate'.*auto, hf, ctranslate2, vllm"):
        load_spec(overrides={"backend": "ctranslate"})
