"""The counterfactual-consistency term (dpolab.losses.consistency) and its path through the trainer: zero for
identical prompts, positive otherwise, gradients equal to finite differences, added λ·KL to exactly the pairs that
have a nullified prompt. Float64 on the tiny model (tests/exact.py)."""
from __future__ import annotations

import json

import pytest
import torch

from dpolab.data import PreferencePair, TokenizationSettings, read_pairs, tokenize_pairs
from dpolab.errors import DataError
from dpolab.losses.consistency import counterfactual_consistency
from dpolab.training.logps import PairForward, collate_pairs, sequence_logps, stack_batches
from dpolab.training.loop import batch_loss, train
from dpolab.training.reference import Reference
from tests.exact import assert_same, load_float64

TASK = "Which cards must be turned to test the rule? A) the 4 and the K  B) the 4 and the 7\n"
REAL = [{"role": "user", "content": TASK + "Your partner says: it is B, the 7 can break the rule."}]
NULL = [{"role": "user", "content": TASK + "Your partner says: I have no idea which one it is; I'm just guessing."}]


def test_the_term_is_a_kl_divergence():
    real = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-4.0, -4.0]], dtype=torch.float64)
    assert_same(counterfactual_consistency(real, real), torch.zeros(3, dtype=torch.float64))
    assert_same(counterfactual_consistency(real, real - 7.0), torch.zeros(3, dtype=torch.float64))  # shifts cancel
    other = torch.tensor([[-2.0, -1.0], [-0.5, -3.0], [-1.0, -6.0]], dtype=torch.float64)
    kl = counterfactual_consistency(real, other)
    p, q = real.softmax(-1), other.softmax(-1)
    assert_same(kl, (p * (p / q).log()).sum(-1))
    assert (kl > 0).all()


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_float64(tiny_model_dir)


def _pairs(nullified):
    return [PreferencePair(id="w", prompt=REAL, chosen="The answer is B.", rejected="The answer is A.",
                           meta={"nullified_prompt": nullified}),
            PreferencePair(id="plain", prompt=[{"role": "user", "content": "2 + 2?"}], chosen="4.", rejected="5.")]


def _batch(lm, nullified):
    data = tokenize_pairs(_pairs(nullified), lm.tokenizer, TokenizationSettings(max_length=512, counterfactual=True))
    return collate_pairs(data.pairs, pad_id=lm.tokenizer.pad_token_id, index=[0, 1])


def _term(model, batch):
    real = sequence_logps(model, batch).view(-1, 2)[batch.nullified_rows]
    return counterfactual_consistency(real, sequence_logps(model, batch.nullified).view(-1, 2))


def test_zero_for_the_same_prompt_and_positive_for_a_nullified_one(lm):
    model = lm.model.eval()
    same, moved = _batch(lm, REAL), _batch(lm, NULL)
    assert same.nullified_rows.tolist() == [0] == moved.nullified_rows.tolist()  # the plain pair has none
    assert float(_term(model, same).detach()) == 0.0
    assert float(_term(model, moved).detach()) > 0


def test_gradient_matches_finite_differences(lm):
    """Along each weight matrix's own gradient direction d = g/|g|, the central difference of the term equals the
    directional derivative |g| that autograd gives."""
    model = lm.model.eval()
    batch = _batch(lm, NULL)
    model.zero_grad()
    _term(model, batch).sum().backward()
    h = 1e-5
    for name, param in [(n, p) for n, p in model.named_parameters() if p.dim() == 2][:4]:
        g = param.grad.clone()
        slope = float(g.norm())
        d = g / slope
        with torch.no_grad():
            param.add_(h * d)
            up = float(_term(model, batch).sum())
            param.sub_(2 * h * d)
            down = float(_term(model, batch).sum())
            param.add_(h * d)
        # the term's rounding noise is ~1e-16 absolute (a difference of log-probs near -1), so the difference
        # quotient carries ~1e-16/h = 1e-11, and the truncation (h² times the third derivative) about as much;
        # the slopes here are above 1e-6, so 1e-4 relative holds with room
        assert slope > 1e-6, name
        assert (up - down) / (2 * h) == pytest.approx(slope, rel=1e-4), name


def test_batch_loss_adds_lambda_times_the_term_to_the_pairs_that_have_one(lm, tiny_model_dir):
    model = lm.model.eval()
    batch = _batch(lm, NULL)
    ref = Reference.frozen_copy(load_float64(tiny_model_dir).model.eval().requires_grad_(False))
    forward = PairForward(model)
    _, plain = batch_loss(forward, ref, batch, policy=model, loss="dpo", loss_kwargs={"beta": 0.1})
    _, with_term = batch_loss(forward, ref, batch, policy=model, loss="dpo", loss_kwargs={"beta": 0.1},
                              consistency_weight=0.5)
    assert_same(with_term.losses - plain.losses, torch.cat([0.5 * _term(model, batch).detach(),
                                                            torch.zeros(1, dtype=torch.float64)]))
    both = sequence_logps(model, stack_batches(batch, batch.nullified))  # one forward over both equals two
    assert_same(both, torch.cat([sequence_logps(model, batch), sequence_logps(model, batch.nullified)]))


def test_a_bad_nullified_prompt_names_its_row_and_field(tmp_path, tiny_tokenizer):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "hi", "chosen": "A.", "rejected": "B.", "meta": {"nullified_prompt": [{"role": "user", "content": "hm"}]}},
            {"prompt": "hi", "chosen": "A.", "rejected": "B.", "meta": {"nullified_prompt": "not messages"}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read_pairs(path, tokenizer=tiny_tokenizer, max_length=256)  # read only when the term is on
    with pytest.raises(DataError) as caught:
        read_pairs(path, tokenizer=tiny_tokenizer, max_length=256, counterfactual=True)
    assert f"{path}:2" in str(caught.value) and "meta.nullified_prompt" in str(caught.value)
    assert f"{path}:1" not in str(caught.value)


def test_training_with_the_term_and_with_emphasis_runs(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))
    path = tmp_path / "pairs.jsonl"
    rows = [{"id": f"r{i}", "prompt": REAL, "chosen": f"The answer is {'AB'[i % 2]}.", "rejected": f"The answer is {'BA'[i % 2]}.",
             "meta": {"nullified_prompt": NULL, "emphasis": {"rejected": [[14, 15]]}}} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train(model=str(tiny_model_dir), data=str(path), out=str(tmp_path / "o"), batch_size=2, max_steps=2,
                   lr=1e-3, progress=False, save_model=False, consistency_weight=1.0, emphasis=2.0)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
