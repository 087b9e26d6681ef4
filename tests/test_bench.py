"""dpolab.bench: workload lengths, the FLOP formula, the template fix for TRL, and the result schema (no TRL, no timings)."""
from __future__ import annotations

import json

import pytest

from dpolab.bench.train import RESULT_KEYS, ModelShape, SystemRun, final_turn_without_newline, model_shape, pair_forward_flops, pair_train_flops, summarize
from dpolab.bench.workloads import WORKLOADS, make_pairs, pair_lengths


@pytest.fixture(scope="module")
def smol_tokenizer(real_model_dir):
    from dpolab.models import load_tokenizer

    return load_tokenizer(str(real_model_dir))


@pytest.mark.real_model
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workload_lengths_in_stated_ranges(name, smol_tokenizer):
    w = WORKLOADS[name]
    rows = make_pairs(name, 24, smol_tokenizer, seed=3)
    assert len(rows) == 24
    for row in rows:
        lens = pair_lengths(row, smol_tokenizer)
        assert w.prompt_tokens[0] <= lens.prompt <= w.prompt_tokens[1]
        assert w.response_tokens[0] <= lens.chosen <= w.response_tokens[1]
        assert w.response_tokens[0] <= lens.rejected <= w.response_tokens[1]
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert make_pairs(name, 24, smol_tokenizer, seed=3) == rows  # seeded: the same file every run
    assert make_pairs(name, 24, smol_tokenizer, seed=4) != rows


@pytest.mark.real_model
def test_persuasion_is_multi_turn(smol_tokenizer):
    rows = make_pairs("persuasion", 32, smol_tokenizer)
    turns = {sum(m["role"] == "user" for m in r["prompt"]) for r in rows}
    assert turns <= {2, 3, 4} and len(turns) > 1  # the question plus 1-3 pushbacks


def test_pair_flops_by_hand():
    shape = ModelShape(non_embedding_params=10, layers=2, attention_dim=4, hidden=3, vocab=5)
    # P=2, C=(1, 3): dense 2*10*6 = 120; query-key pairs 3 + (1*2 + 1) + (3*2 + 6) = 18, attention 4*2*4*18 = 576;
    # LM head 2*3*5*4 = 120.
    assert pair_forward_flops(shape, 2, 1, 3) == 120 + 576 + 120
    assert pair_train_flops(shape, 2, 1, 3) == 4 * 816


def test_model_shape_counts_non_embedding_params(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    cfg = model.config
    shape = model_shape(tiny_model_dir)
    embedding = cfg.vocab_size * cfg.hidden_size  # tied: the LM head is the same matrix
    assert shape.non_embedding_params == sum(p.numel() for p in model.parameters()) - embedding
    assert (shape.layers, shape.hidden, shape.vocab) == (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    assert shape.attention_dim == cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)


def test_template_fix_keeps_prompts_and_ends_answers_at_end_of_turn(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    fixed = final_turn_without_newline(tiny_tokenizer.chat_template)
    assert fixed != tiny_tokenizer.chat_template
    render = lambda template, msgs, gen: tiny_tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    assert render(fixed, messages[:1], True) == render(tiny_tokenizer.chat_template, messages[:1], True)
    assert render(fixed, messages, False).endswith("Hello<|im_end|>")
    assert render(tiny_tokenizer.chat_template, messages, False).endswith("Hello<|im_end|>\n")


def _run(system: str, losses: list[float], pairs_per_s: float, rss: float) -> SystemRun:
    return SystemRun(system=system, time_s=8 / pairs_per_s, setup_s=1.0, steps=len(losses), pairs_per_s=pairs_per_s,
                     peak_rss_mb=rss, losses=losses)


def test_summary_compares_with_the_faster_and_the_leaner_trl():
    runs = {"dpolab": _run("dpolab", [0.69, 0.5], 1.0, 1000.0),
            "trl-default": _run("trl-default", [0.69, 0.5004], 0.2, 3000.0),
            "trl-precompute": _run("trl-precompute", [0.69, 0.4999], 0.25, 5000.0)}
    s = summarize(runs, flops=8e9, matmul_peak=1e11)
    assert s["trl_fastest"] == "trl-precompute" and s["speedup"] == pytest.approx(4.0)
    assert s["trl_leanest"] == "trl-default" and s["trl_peak_rss_mb"] == 3000.0
    assert s["max_step_loss_diff"] == pytest.approx(4e-4)
    assert s["dpolab_model_flops_per_s"] == pytest.approx(1e9)
    runs["trl-default"] = _run("trl-default", [0.69], 0.2, 3000.0)  # a missing step never passes as equal
    assert summarize(runs, flops=8e9, matmul_peak=1e11)["max_step_loss_diff"] == float("inf")


@pytest.mark.real_model
def test_cli_result_schema_without_trl(tiny_model_dir, real_model_dir, tmp_path):
    from typer.testing import CliRunner

    from dpolab.cli import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "train", "--steps", "1", "--pairs", "8", "--systems", "dpolab", "--model",
                                   str(tiny_model_dir), "--length-tokenizer", str(real_model_dir), "--threads", "1",
                                   "--json", str(out), "--keep", str(tmp_path / "work")])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert set(result) >= {"hardware", "workloads"}
    assert result["hardware"]["threads"] == 1 and result["hardware"]["matmul_peak_flops_per_s"] > 0
    assert set(result["workloads"]) == {"persuasion", "short"}
    for w in result["workloads"].values():
        assert set(w) >= set(RESULT_KEYS)
        assert w["dpolab_pairs_per_s"] > 0 and w["dpolab_peak_rss_mb"] > 0 and w["dpolab_model_flops_per_s"] > 0
        assert w["trl_pairs_per_s"] is None and w["speedup"] is None and w["max_step_loss_diff"] is None
        assert len(w["systems"]["dpolab"]["losses"]) == 1
    assert "speedup" in res.output  # the table


def test_unknown_system_lists_the_choices():
    from dpolab.bench.train import BenchSettings
    from dpolab.errors import ConfigError

    with pytest.raises(ConfigError, match="trl-precompute"):
        BenchSettings(systems=("trl",))
