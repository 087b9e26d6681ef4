"""The forward pass: prefix-shared == concatenated == plain full logits; the chunked LM head == full logits.

Each test claims two computations are the same mathematics, so the model runs in float64: there they agree to
~1e-14 relative, and a tolerance of 1e-9 relative (to the largest value compared) holds on any CPU, whatever
its summation order (tests/exact.py). In fp32 they differ by a rounding step of ~1e-5 at log-probs near -170.
"""
from __future__ import annotations

import pytest
import torch

from dpolab.training.logps import collate_pairs, sequence_logps, token_logps
from tests.exact import assert_same, float64_eager_attention, load_float64


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_float64(tiny_model_dir).model.eval()


@pytest.fixture(scope="module")
def mixed_batch(tiny_tokenizer):
    """Multi-turn prompts of different lengths, completions of different lengths, through the chat template."""
    from dpolab.data import PreferencePair, TokenizationSettings, tokenize_pairs

    turns = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "No, it is Lyon. My teacher said so."}]
    pairs = [PreferencePair(id="a", prompt=turns[:1], chosen="Paris.", rejected="It is Lyon, as you say."),
             PreferencePair(id="b", prompt=turns, chosen="I understand, but it is Paris.", rejected="Lyon."),
             PreferencePair(id="c", prompt=turns[:1] + [{"role": "assistant", "content": "Hmm."}, turns[2]], chosen="Still Paris.",
                            rejected="You are right.")]
    data = tokenize_pairs(pairs, tiny_tokenizer, TokenizationSettings(max_length=512))
    assert len({len(p.prompt_ids) for p in data.pairs}) == 3
    return collate_pairs(data.pairs, pad_id=tiny_tokenizer.pad_token_id, index=[0, 1, 2]), data.pairs


def _plain(model, pairs):
    out = []
    for p in pairs:
        for comp in (p.chosen_ids, p.rejected_ids):
            logits = model(input_ids=torch.tensor([p.prompt_ids + comp])).logits[0]
            lp = logits.log_softmax(-1)
            out.append(sum(lp[len(p.prompt_ids) - 1 + t, comp[t]] for t in range(len(comp))))
    return torch.stack(out)


def _value_and_grads(model, fn):
    model.zero_grad()
    value = fn()
    (value * torch.linspace(1, 2, len(value), dtype=value.dtype)).sum().backward()  # distinct weights: each entry's gradient counts
    return value.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["prefix", "concat"])
def test_forward_modes_match_plain_forward(model, mixed_batch, mode):
    batch, pairs = mixed_batch
    ours, g_ours = _value_and_grads(model, lambda: sequence_logps(model, batch, mode=mode, chunk_tokens=5))
    ref, g_ref = _value_and_grads(model, lambda: _plain(model, pairs))
    assert_same(ours, ref)
    for a, b in zip(g_ours, g_ref):
        assert_same(a, b)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_paths_match_plain_forward(model, mixed_batch, attention):
    """SDPA takes a block mask (chosen and rejected side by side in one row after the prompt's cache); eager
    attention gets the prompt's cache repeated for each completion. Both equal the plain forward."""
    from dpolab.training import logps as module

    batch, pairs = mixed_batch
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query heads are exercised
    model.set_attn_implementation(attention)
    try:
        assert module.takes_block_masks(model.model.config) == (attention == "sdpa")
        with float64_eager_attention():
            ours, g_ours = _value_and_grads(model, lambda: sequence_logps(model, batch, mode="prefix", chunk_tokens=4))
            ref, g_ref = _value_and_grads(model, lambda: _plain(model, pairs))
    finally:
        model.set_attn_implementation("sdpa")
    assert_same(ours, ref)
    for a, b in zip(g_ours, g_ref):
        assert_same(a, b)
    assert module._GQA_ENV not in __import__("os").environ  # the switch is set only during the call


def test_prefix_matches_concat(model, mixed_batch):
    batch, _ = mixed_batch
    a, ga = _value_and_grads(model, lambda: sequence_logps(model, batch, mode="prefix"))
    b, gb = _value_and_grads(model, lambda: sequence_logps(model, batch, mode="concat"))
    assert_same(a, b)
    for x, y in zip(ga, gb):
        assert_same(x, y)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logps_equal_full_logits(chunk, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=bias).double()
    hidden = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    upstream = torch.randn(11, dtype=torch.float64)

    ours = token_logps(head, hidden, targets, chunk_tokens=chunk)
    grads = torch.autograd.grad((ours * upstream).sum(), [hidden, head.weight] + ([head.bias] if bias else []))
    full = head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    expected = torch.autograd.grad((full * upstream).sum(), [hidden, head.weight] + ([head.bias] if bias else []))
    assert_same(ours, full)
    for a, b in zip(grads, expected):
        assert_same(a, b)


def test_architecture_without_a_separable_head_falls_back(model, mixed_batch, caplog):
    """A model whose logits are post-processed (e.g. softcapping) uses its own forward: still exact."""
    batch, pairs = mixed_batch
    model.config.logit_scale = 1.0  # as in Cohere: logits are scaled after the head
    try:
        with caplog.at_level("WARNING"):
            out = sequence_logps(model, batch, mode="prefix")
        assert "concatenated forward" in caplog.text
        assert_same(out.detach(), _plain(model, pairs).detach())
    finally:
        del model.config.logit_scale


def test_float64_models_compute_their_norms_in_float64(model):
    """transformers' RMSNorm casts to float32; dpolab's float64 keeps float64 (dpolab.models.precision)."""
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    x = torch.randn(3, model.config.hidden_size, dtype=torch.float64) * 1e3 + 1 / 3
    for norm in norms:
        expected = norm.weight * x / x.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).sqrt()
        assert_same(norm(x), expected, rtol=1e-13)  # a float32 cast would miss by ~1e-8
