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


# -- token-weighted DPO: emphasis spans ------------------------------------------------------------------------

def _plain_weighted(model, pairs):
    """Each completion's sum of w_t log p(y_t | ...), token by token from one full forward: the independent
    computation the weighted forward paths must equal."""
    out = []
    for p in pairs:
        for comp, w in ((p.chosen_ids, p.chosen_weights), (p.rejected_ids, p.rejected_weights)):
            w = w or [1.0] * len(comp)
            lp = model(input_ids=torch.tensor([p.prompt_ids + comp])).logits[0].log_softmax(-1)
            out.append(sum(w[t] * lp[len(p.prompt_ids) - 1 + t, comp[t]] for t in range(len(comp))))
    return torch.stack(out)


@pytest.fixture(scope="module")
def emphasis_pairs(tiny_tokenizer):
    from dpolab.data import PreferencePair, TokenizationSettings, tokenize_pairs

    said = "Paris. As I mentioned earlier, it is the capital."
    pairs = [PreferencePair(id="a", prompt=[{"role": "user", "content": "Capital of France?"}], chosen="Paris.",
                            rejected=said, meta={"emphasis": {"rejected": [[7, 49]]}}),
             PreferencePair(id="b", prompt=[{"role": "user", "content": "And of Italy, briefly?"}], chosen="Rome.",
                            rejected="Rome, like before.", meta={"emphasis": {"rejected": [[4, 17]], "chosen": [[0, 4]]}}),
             PreferencePair(id="c", prompt=[{"role": "user", "content": "Spain?"}], chosen="Madrid.", rejected="Bilbao.")]
    weighted = tokenize_pairs(pairs, tiny_tokenizer, TokenizationSettings(max_length=512, emphasis=3.0)).pairs
    plain = tokenize_pairs(pairs, tiny_tokenizer, TokenizationSettings(max_length=512)).pairs
    return pairs, weighted, plain


def test_emphasis_weights_mark_exactly_the_span_tokens(emphasis_pairs, tiny_tokenizer):
    pairs, weighted, plain = emphasis_pairs
    a = weighted[0]
    # the tiny tokenizer is byte-level: one token per character, then the end-of-turn token
    assert a.rejected_weights == [1.0] * 7 + [3.0] * 42 + [1.0]
    assert a.chosen_weights is None  # no span in the chosen
    assert weighted[1].chosen_weights == [3.0] * 4 + [1.0] * 2
    assert weighted[2].chosen_weights is None and weighted[2].rejected_weights is None
    assert all(p.chosen_weights is None and p.rejected_weights is None for p in plain)  # emphasis 1: spans ignored
    assert [p.chosen_ids for p in weighted] == [p.chosen_ids for p in plain]


@pytest.mark.parametrize("mode,attention", [("prefix", "sdpa"), ("prefix", "eager"), ("concat", "sdpa")])
def test_weighted_forward_paths_equal_the_weighted_token_sum(model, emphasis_pairs, tiny_tokenizer, mode, attention):
    _, weighted, _ = emphasis_pairs
    batch = collate_pairs(weighted, pad_id=tiny_tokenizer.pad_token_id)
    assert batch.token_weights is not None
    model.set_attn_implementation(attention)
    try:
        with float64_eager_attention():
            ours, g_ours = _value_and_grads(model, lambda: sequence_logps(model, batch, mode=mode, chunk_tokens=4))
            ref, g_ref = _value_and_grads(model, lambda: _plain_weighted(model, weighted))
    finally:
        model.set_attn_implementation("sdpa")
    assert_same(ours, ref)
    for a, b in zip(g_ours, g_ref):
        assert_same(a, b)


def test_uniform_token_weights_are_plain_dpo(model, emphasis_pairs, tiny_tokenizer):
    """Weights of 1 on every token give the unweighted log-probs (so the DPO loss on them is plain DPO)."""
    import dataclasses

    _, _, plain = emphasis_pairs
    ones = [dataclasses.replace(p, chosen_weights=[1.0] * len(p.chosen_ids), rejected_weights=[1.0] * len(p.rejected_ids))
            for p in plain]
    with_ones = collate_pairs(ones, pad_id=tiny_tokenizer.pad_token_id)
    without = collate_pairs(plain, pad_id=tiny_tokenizer.pad_token_id)
    assert with_ones.token_weights is not None and without.token_weights is None
    assert_same(sequence_logps(model, with_ones).detach(), sequence_logps(model, without).detach())


def test_bad_emphasis_span_names_the_file_row_and_field(tmp_path, tiny_tokenizer):
    import json

    from dpolab.data import read_pairs
    from dpolab.errors import DataError

    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "hi", "chosen": "ok.", "rejected": "As before, ok.", "meta": {"emphasis": {"rejected": [[0, 10]]}}},
            {"prompt": "hi", "chosen": "ok.", "rejected": "As before, ok.", "meta": {"emphasis": {"rejected": [[5, 99]]}}}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    read_pairs(path, tokenizer=tiny_tokenizer, max_length=256)  # spans are read only when emphasis is on
    with pytest.raises(DataError) as caught:
        read_pairs(path, tokenizer=tiny_tokenizer, max_length=256, emphasis=2.0)
    assert f"{path}:2" in str(caught.value) and "meta.emphasis.rejected" in str(caught.value)
    assert f"{path}:1" not in str(caught.value)
