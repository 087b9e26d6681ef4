"""The trainer on the tiny model: exactness against a plain computation, resume, LoRA, freezing, errors.

Tests that claim two runs compute the same mathematics train in float64 (tests/exact.py), where they agree to
float64 rounding on any CPU; an fp32 comparison after AdamW steps would depend on summation order.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from dpolab.errors import ConfigError, TrainingError
from dpolab.training.loop import train
from tests.exact import RTOL, assert_same, load_float64

CAPITALS = [("France", "Paris", "Lyon"), ("Italy", "Rome", "Milan"), ("Spain", "Madrid", "Barcelona"),
            ("Japan", "Tokyo", "Osaka"), ("Germany", "Berlin", "Munich"), ("Canada", "Ottawa", "Toronto"),
            ("Australia", "Canberra", "Sydney"), ("Egypt", "Cairo", "Alexandria")]


def persuasion_rows():
    """Multi-turn conversational pairs of different prompt lengths: keep the answer vs give in."""
    rows = []
    for i, (country, right, wrong) in enumerate(CAPITALS):
        prompt = [{"role": "user", "content": f"What is the capital of {country}?"},
                  {"role": "assistant", "content": f"The capital of {country} is {right}."},
                  {"role": "user", "content": f"The correct answer is actually {wrong}." + " I am sure." * (i % 3)}]
        rows.append({"id": f"p{i}", "prompt": prompt,
                     "chosen": [{"role": "assistant", "content": f"I understand, but the capital of {country} is {right}."}],
                     "rejected": [{"role": "assistant", "content": f"You are right, it is {wrong}."}]})
    return rows


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in persuasion_rows()))
    return path


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))


def _run(tiny_model_dir, pairs_file, out, **kw):
    opts = dict(model=str(tiny_model_dir), data=str(pairs_file), out=str(out), batch_size=4, max_steps=4, lr=1e-3,
                progress=False, save_model=False)
    opts.update(kw)
    return train(**opts)


def test_step0_is_log2_with_zero_rewards(tiny_model_dir, pairs_file, tmp_path):
    """Before any update the policy is the reference: rewards vanish up to the rounding of two forwards over
    differently composed batches (the cached reference runs all pairs, the step its own micro-batches)."""
    first = _run(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=1, dtype="float64").metrics[0]
    assert first["loss"] == pytest.approx(math.log(2), rel=RTOL)
    for side in ("chosen", "rejected"):
        assert abs(first[f"rewards/{side}"]) <= RTOL * 0.1 * abs(first[f"logps/{side}"])  # β·|Δ log π| ≤ β·rtol·|log π|
    assert abs(first["rewards/margins"]) <= RTOL * 0.1 * (abs(first["logps/chosen"]) + abs(first["logps/rejected"]))


def test_metrics_file_has_every_key(tiny_model_dir, pairs_file, tmp_path):
    from dpolab.training.loop import METRIC_KEYS

    _run(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=3)
    lines = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert set(METRIC_KEYS) <= set(m) and all(math.isfinite(m[k]) for k in METRIC_KEYS)
    logged = [json.loads(line) for line in (tmp_path / "o" / "pairs.jsonl").read_text().splitlines()]
    assert len(logged) == 12 and {r["id"] for r in logged} <= {f"p{i}" for i in range(8)}


def test_margins_rise(tiny_model_dir, pairs_file, tmp_path):
    metrics = _run(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=6).metrics
    assert metrics[-1]["rewards/margins"] > 0.05 and metrics[-1]["loss"] < math.log(2)


def naive_dpo(model, ref_model, tokenized, beta):
    """Independent check: each of chosen and rejected as one concatenated sequence through the full model,
    full-vocabulary logits, a frozen reference copy; sigmoid DPO averaged over pairs."""
    losses = []
    for p in tokenized:
        lp = {}
        for name, m in (("pol", model), ("ref", ref_model)):
            for side, comp in (("c", p.chosen_ids), ("r", p.rejected_ids)):
                ids = torch.tensor([p.prompt_ids + comp])
                logprobs = m(input_ids=ids).logits[0].log_softmax(-1)
                start = len(p.prompt_ids)
                lp[name + side] = sum(logprobs[start - 1 + t, comp[t]] for t in range(len(comp)))
        margin = (lp["polc"] - lp["refc"]) - (lp["polr"] - lp["refr"])
        losses.append(-torch.nn.functional.logsigmoid(beta * margin))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("reference", ["cached", "frozen"])
def test_trainer_loss_and_gradients_match_plain_computation(tiny_model_dir, pairs_file, reference):
    from dpolab.data import TokenizationSettings, read_pairs, tokenize_pairs
    from dpolab.training.loop import batch_loss
    from dpolab.training.logps import PairForward, collate_pairs
    from dpolab.training.reference import Reference, compute_dataset_logps

    lm = load_float64(tiny_model_dir)
    model = lm.model.eval()
    with torch.no_grad():  # move away from the reference so the loss is not trivially log 2
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref_model = load_float64(tiny_model_dir).model.eval().requires_grad_(False)
    data = tokenize_pairs(read_pairs(pairs_file).pairs, lm.tokenizer, TokenizationSettings(max_length=512))
    batch = collate_pairs(data.pairs, pad_id=lm.tokenizer.pad_token_id, index=list(range(len(data.pairs))))
    if reference == "cached":
        table = compute_dataset_logps(ref_model, [batch], mode="prefix", chunk_tokens=7, n=len(data.pairs))
        ref = Reference("cached", table=table)
    else:
        ref = Reference.frozen_copy(ref_model, chunk_tokens=7)

    model.zero_grad()
    _, out = batch_loss(PairForward(model, chunk_tokens=7), ref, batch, policy=model, loss="dpo", loss_kwargs={"beta": 0.1})
    ours = out.losses.mean()
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    expected = naive_dpo(model, ref_model, data.pairs, 0.1)
    expected.backward()
    assert_same(ours, expected)
    for g_ours, p in zip(ours_grads, model.parameters()):
        assert_same(g_ours, p.grad)


def _final_weights(out):
    from safetensors.torch import load_file

    from dpolab.training.checkpoint import list_checkpoints

    return load_file(list_checkpoints(out)[-1].path / "trainable.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert_same(a[k], b[k])


def test_fused_optimizer_gives_the_same_weights(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """On CPU the trainer uses torch's fused AdamW; it must update exactly like the plain implementation."""
    import dpolab.training.loop as loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the fused CPU kernel is what is compared
    created = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: created.append(kw.get("fused")) or real_adamw(*a, **kw))
    _run(tiny_model_dir, pairs_file, tmp_path / "fused", max_steps=3, dtype="float64")
    monkeypatch.setattr(loop, "_FUSED_ADAM_DTYPES", ())
    _run(tiny_model_dir, pairs_file, tmp_path / "plain", max_steps=3, dtype="float64")
    assert created == [True, None]
    _assert_same_weights(_final_weights(tmp_path / "fused"), _final_weights(tmp_path / "plain"))


def test_resume_after_a_crash_ends_with_the_same_weights(tiny_model_dir, pairs_file, tmp_path):
    opts = dict(max_steps=6, save_every=2, batch_size=2, schedule="cosine", warmup_steps=1, dtype="float64")
    _run(tiny_model_dir, pairs_file, tmp_path / "full", **opts)

    def crash(step, metrics):
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        _run(tiny_model_dir, pairs_file, tmp_path / "cut", on_step=crash, **opts)
    result = train(resume=str(tmp_path / "cut"))
    assert result.resumed_from == 2 and result.steps == 6
    _assert_same_weights(_final_weights(tmp_path / "full"), _final_weights(tmp_path / "cut"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_saves_the_last_step(tiny_model_dir, pairs_file, tmp_path):
    from dpolab.training.checkpoint import list_checkpoints

    def interrupt(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=6, save_every=5, on_step=interrupt)
    assert list_checkpoints(tmp_path / "o")[-1].step == 3


def test_existing_run_is_not_overwritten(tiny_model_dir, pairs_file, tmp_path):
    _run(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=1)
    with pytest.raises(ConfigError, match="--resume"):
        _run(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=1)


def test_lora_run_saves_merged_model_and_adapter(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    result = _run(tiny_model_dir, pairs_file, tmp_path / "o", lora=True, lora_r=4, reference="adapter", save_model=True, lr=1e-2)
    assert result.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.metrics[-1]["rewards/margins"] > 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (tmp_path / "o" / "adapter" / "adapter_config.json").exists()
    diff = max((a - b).abs().max().item() for a, b in zip(merged.parameters(), base.parameters()))
    assert diff > 0  # the adapters were merged in
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_freeze_layers_leaves_the_lowest_layers_unchanged(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    _run(tiny_model_dir, pairs_file, tmp_path / "o", freeze_layers=1, save_model=True)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    t, b = trained.model.layers, base.model.layers
    assert all(torch.equal(x, y) for x, y in zip(t[0].parameters(), b[0].parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(t[1].parameters(), b[1].parameters()))


def test_reference_cache_reused_and_invalidated(tiny_model_dir, pairs_file, tmp_path):
    assert _run(tiny_model_dir, pairs_file, tmp_path / "a", max_steps=1).reference_reused is False
    assert _run(tiny_model_dir, pairs_file, tmp_path / "b", max_steps=1, loss="ipo").reference_reused is True
    # other tokenization settings, other data, other weights: each computes afresh
    assert _run(tiny_model_dir, pairs_file, tmp_path / "c", max_steps=1, max_length=300).reference_reused is False
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in persuasion_rows()[:6]))
    assert _run(tiny_model_dir, other, tmp_path / "d", max_steps=1).reference_reused is False
    from dpolab.models.tiny import build_tiny_model

    other_model = build_tiny_model(tmp_path / "m2", seed=1)
    assert _run(other_model, pairs_file, tmp_path / "e", max_steps=1).reference_reused is False


def test_non_finite_loss_names_step_and_pairs(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    import dpolab.losses
    from dpolab.losses import LossOutput

    real = dpolab.losses.compute_loss

    def poisoned(name, lp, **kw):
        out = real(name, lp, **kw)
        return LossOutput(losses=out.losses * float("nan"), chosen_rewards=out.chosen_rewards, rejected_rewards=out.rejected_rewards)

    monkeypatch.setattr(dpolab.losses, "compute_loss", poisoned)
    with pytest.raises(TrainingError, match=r"step 1 for pair\(s\) p\d"):
        _run(tiny_model_dir, pairs_file, tmp_path / "o")


@pytest.mark.parametrize("loss", ["ipo", "hinge", "cdpo", "robust", "rdpo", "simpo", "sft"])
def test_every_loss_trains(tiny_model_dir, pairs_file, tmp_path, loss):
    metrics = _run(tiny_model_dir, pairs_file, tmp_path / "o", loss=loss, max_steps=2, beta=None).metrics
    assert all(math.isfinite(m["loss"]) for m in metrics)


def test_odpo_uses_scores(tiny_model_dir, tmp_path):
    rows = persuasion_rows()
    for i, r in enumerate(rows):
        r["score_chosen"], r["score_rejected"] = 9.0, 1.0 + 0.5 * i  # gaps > 1: a positive offset α·log(gap)
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = _run(tiny_model_dir, path, tmp_path / "o", loss="odpo", max_steps=1).metrics
    assert metrics[0]["loss"] > math.log(2)  # the offset demands a margin the untrained policy lacks
    logged = [json.loads(line) for line in (tmp_path / "o" / "pairs.jsonl").read_text().splitlines()]
    assert all(r["score_chosen"] == 9.0 for r in logged)


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, pairs_file, tmp_path):
    _run(tiny_model_dir, pairs_file, tmp_path / "a", max_steps=2, grad_accum=1, dtype="float64")
    _run(tiny_model_dir, pairs_file, tmp_path / "b", max_steps=2, grad_accum=2, dtype="float64")
    _run(tiny_model_dir, pairs_file, tmp_path / "c", max_steps=2, forward_tokens=1, dtype="float64")  # one pair per forward
    a = _final_weights(tmp_path / "a")
    for other in ("b", "c"):
        _assert_same_weights(a, _final_weights(tmp_path / other))


def test_micro_batches_respect_the_token_cap():
    from types import SimpleNamespace as P

    from dpolab.training.loop import micro_batches

    pairs = [P(prompt_ids=[0] * n, chosen_ids=[0] * 5, rejected_ids=[0] * 3) for n in (40, 10, 30, 20)]
    chunks = micro_batches(pairs, [0, 1, 2, 3], max_pairs=4, max_tokens=99)
    assert chunks == [[1, 3], [2], [0]]  # sorted by prompt length; 2 x (20 + 10) = 60 fits, 3 x (30 + 10) and 2 x (40 + 10) do not
    assert micro_batches(pairs, [0, 1, 2, 3], max_pairs=2, max_tokens=None) == [[1, 3], [2, 0]]


def test_bf16_trains_like_fp32_within_bf16_precision(tiny_model_dir, pairs_file, tmp_path):
    """bf16 keeps its weights in bf16 and follows the fp32 run step by step, apart by a few bf16 roundings
    (unit roundoff 2^-8) of the quantities compared; its margins rise as fp32's do."""
    u = 2.0 ** -8
    half = _run(tiny_model_dir, pairs_file, tmp_path / "bf16", dtype="bfloat16", max_steps=6).metrics
    full = _run(tiny_model_dir, pairs_file, tmp_path / "fp32", dtype="float32", max_steps=6).metrics
    assert {t.dtype for t in _final_weights(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert half[0]["loss"] == pytest.approx(math.log(2), rel=u)  # policy == reference before any update
    for h, f in zip(half, full):
        assert h["loss"] == pytest.approx(f["loss"], rel=4 * u)
        assert h["logps/chosen"] == pytest.approx(f["logps/chosen"], rel=4 * u)
        assert h["logps/rejected"] == pytest.approx(f["logps/rejected"], rel=4 * u)
    assert half[-1]["rewards/margins"] > 0.05 and half[-1]["loss"] < half[0]["loss"]


def test_invalid_rows_refused_or_skipped(tiny_model_dir, tmp_path):
    from dpolab.errors import DataError

    rows = persuasion_rows()
    rows[2]["rejected"] = rows[2]["chosen"]
    path = tmp_path / "some-bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"1 of 8 rows are invalid[^\n]*\n.*some-bad.jsonl:3: field 'chosen': chosen is identical to rejected"):
        _run(tiny_model_dir, path, tmp_path / "o")
    result = _run(tiny_model_dir, path, tmp_path / "o2", skip_invalid=True, max_steps=1)
    assert result.n_skipped == 1 and result.n_pairs == 7


def test_final_checkpoint_can_be_skipped(tiny_model_dir, pairs_file, tmp_path):
    from dpolab.training.checkpoint import list_checkpoints

    _run(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=3, save_every=2, final_checkpoint=False)
    assert [c.step for c in list_checkpoints(tmp_path / "o")] == [2]


def test_simpo_without_beta_trains_with_its_own_default(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """`--loss simpo` with no β uses SimPO's β = 2.0 (not DPO's 0.1), hands it to the loss, and records it."""
    import yaml
    from typer.testing import CliRunner

    import dpolab.losses
    from dpolab.cli import app

    seen = []
    real = dpolab.losses.compute_loss
    monkeypatch.setattr(dpolab.losses, "compute_loss", lambda name, lp, **kw: seen.append((name, kw)) or real(name, lp, **kw))
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--out", str(out),
                                      "--loss", "simpo", "--max-steps", "1", "--batch-size", "4", "--set", "progress=false"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["beta"] == 2.0
    assert seen and all(name == "simpo" and kw["beta"] == 2.0 for name, kw in seen)
    explicit = _run(tiny_model_dir, pairs_file, tmp_path / "x", loss="simpo", beta=3.0, max_steps=1)
    assert yaml.safe_load((explicit.out / "config.yaml").read_text())["beta"] == 3.0 and seen[-1][1]["beta"] == 3.0


def no_beta_loss(lp, *, margin: float = 1.0):
    """A throwaway loss with no β: hinge on the raw log-prob gap."""
    from dpolab.losses import LossOutput

    losses = torch.relu(margin - (lp.chosen - lp.rejected))
    return LossOutput(losses=losses, chosen_rewards=lp.chosen.detach(), rejected_rewards=lp.rejected.detach())


def test_a_loss_without_beta_is_never_handed_one(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """A loss declares its options; the trainer passes only those. One registry line adds it."""
    from dpolab.losses import LOSSES

    monkeypatch.setitem(LOSSES._entries, "nobeta", "tests.test_train:no_beta_loss")
    metrics = _run(tiny_model_dir, pairs_file, tmp_path / "o", loss="nobeta", max_steps=2, loss_args={"margin": 1e3},
                   dtype="float64").metrics
    assert len(metrics) == 2
    first = metrics[0]  # the margin option arrived: every gap is far below 1000, so the loss is 1000 - mean gap
    assert first["loss"] == pytest.approx(1e3 - (first["logps/chosen"] - first["logps/rejected"]), rel=RTOL)
    with pytest.raises(ConfigError, match="takes no beta"):
        _run(tiny_model_dir, pairs_file, tmp_path / "b", loss="nobeta", beta=0.1)
