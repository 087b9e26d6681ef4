"""dpolab.data.tokenization on the tiny byte-level ChatML tokenizer (one token per byte, pad id == <|im_end|>)."""
from __future__ import annotations

import json

import pytest

from dpolab.data import (
    PairTokenizationError,
    PreferencePair,
    TokenizationSettings,
    end_of_turn_id,
    tokenize_pair,
    tokenize_pairs,
    validate,
)
from dpolab.errors import ConfigError, DataError

SYSTEM = {"role": "system", "content": "Be brief."}


def render(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt))


def long_pair(pair_id="long") -> PreferencePair:
    prompt = [SYSTEM, {"role": "user", "content": "U" * 40}, {"role": "assistant", "content": "A" * 40},
              {"role": "user", "content": "last"}]
    return PreferencePair(id=pair_id, prompt=prompt, chosen="Yes", rejected="No")


def test_end_of_turn_is_im_end_which_is_also_the_pad_id(tiny_tokenizer):
    eot = end_of_turn_id(tiny_tokenizer)
    assert eot == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") == tiny_tokenizer.pad_token_id


def test_prompt_plus_completion_is_the_full_render_up_to_end_of_turn(tiny_tokenizer):
    pair = PreferencePair(id="a", prompt=[SYSTEM, {"role": "user", "content": "Hi"}], chosen="Hello!", rejected="Go.")
    t = tokenize_pair(pair, tiny_tokenizer, TokenizationSettings())
    eot = end_of_turn_id(tiny_tokenizer)
    assert t.prompt_ids == render(tiny_tokenizer, pair.prompt, add_generation_prompt=True)
    for answer, ids in ((pair.chosen, t.chosen_ids), (pair.rejected, t.rejected_ids)):
        full = render(tiny_tokenizer, pair.prompt + [{"role": "assistant", "content": answer}])
        assert ids[-1] == eot and ids.count(eot) == 1
        assert t.prompt_ids + ids == full[: len(t.prompt_ids) + len(ids)]
        assert tiny_tokenizer.decode(full[len(t.prompt_ids) + len(ids):]) == "\n"  # the template's trailing newline is dropped
        assert tiny_tokenizer.decode(ids) == answer + "<|im_end|>"
    assert (t.prompt_truncated, t.weight, t.score_chosen) == (0, 1.0, None)


def test_truncation_drops_from_the_left_and_keeps_the_last_turn(tiny_tokenizer):
    pair = long_pair()
    full = render(tiny_tokenizer, pair.prompt, add_generation_prompt=True)
    completion = len("Yes") + 1  # one token per byte, plus <|im_end|>
    t = tokenize_pair(pair, tiny_tokenizer, TokenizationSettings(max_length=len(full) + completion - 30))
    assert t.prompt_truncated == 30
    assert t.prompt_ids == full[30:]
    assert len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) == len(full) + completion - 30
    assert tiny_tokenizer.decode(t.prompt_ids).endswith("<|im_start|>user\nlast<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_cut_stops_at_the_last_message(tiny_tokenizer):
    pair = long_pair()
    protected = len(tiny_tokenizer("<|im_start|>user\nlast<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    completion = len("Yes") + 1
    t = tokenize_pair(pair, tiny_tokenizer, TokenizationSettings(max_length=protected + completion))
    assert len(t.prompt_ids) == protected
    with pytest.raises(PairTokenizationError) as info:
        tokenize_pair(pair, tiny_tokenizer, TokenizationSettings(max_length=protected + completion - 1))
    full = len(render(tiny_tokenizer, pair.prompt, add_generation_prompt=True))
    assert (info.value.field, info.value.reason) == (
        "prompt", f"prompt too long to leave room for the completion (prompt {full} tokens, completion {completion} tokens, "
                  f"max_length {protected + completion - 1})")


def test_a_one_message_prompt_is_never_cut(tiny_tokenizer):
    pair = PreferencePair(id="a", prompt=[{"role": "user", "content": "Hi"}], chosen="Yes", rejected="No")
    full = len(render(tiny_tokenizer, pair.prompt, add_generation_prompt=True))
    with pytest.raises(PairTokenizationError, match="prompt too long"):
        tokenize_pair(pair, tiny_tokenizer, TokenizationSettings(max_length=full + 3))


def test_completion_longer_than_max_length_is_invalid(tiny_tokenizer):
    pair = PreferencePair(id="a", prompt=[{"role": "user", "content": "Hi"}], chosen="Y" * 20, rejected="No")
    with pytest.raises(PairTokenizationError) as info:
        tokenize_pair(pair, tiny_tokenizer, TokenizationSettings(max_length=20))
    assert (info.value.field, info.value.reason) == ("chosen", "completion too long (21 tokens, max_length 20); completions are never truncated")


def test_an_answer_holding_the_end_of_turn_token_is_invalid(tiny_tokenizer):
    pair = PreferencePair(id="a", prompt=[{"role": "user", "content": "Hi"}], chosen="Yes<|im_end|>", rejected="No")
    with pytest.raises(PairTokenizationError, match="the answer contains the end-of-turn token '<|im_end|>'"):
        tokenize_pair(pair, tiny_tokenizer, TokenizationSettings())


def test_tokenize_pairs_counts_truncation_and_fingerprints(tiny_tokenizer):
    short = PreferencePair(id="s", prompt=[{"role": "user", "content": "Hi"}], chosen="Yes", rejected="No")
    settings = TokenizationSettings(max_length=120)
    data = tokenize_pairs([short, long_pair()], tiny_tokenizer, settings)
    assert [t.prompt_truncated > 0 for t in data.pairs] == [False, True]
    assert data.n_prompt_truncated == 1
    assert data.fingerprint == tokenize_pairs([short, long_pair()], tiny_tokenizer, settings).fingerprint
    assert data.fingerprint != tokenize_pairs([short, long_pair()], tiny_tokenizer, TokenizationSettings(max_length=121)).fingerprint
    assert data.fingerprint != tokenize_pairs([short, long_pair("other")], tiny_tokenizer, settings).fingerprint
    assert settings.key() == {"max_length": 120, "version": 1}
    # token weights change the reference log-probs, a counterfactual prompt does not (the reference never reads it)
    assert TokenizationSettings(max_length=120, emphasis=2.0).key() == {"max_length": 120, "version": 1, "emphasis": 2.0}
    assert TokenizationSettings(max_length=120, counterfactual=True).key() == settings.key()


def test_tokenize_pairs_lists_every_pair_that_does_not_fit(tiny_tokenizer):
    pairs = [long_pair("x"), long_pair("y")]
    with pytest.raises(DataError, match=r"2 of 2 pairs cannot be tokenized") as info:
        tokenize_pairs(pairs, tiny_tokenizer, TokenizationSettings(max_length=10))
    assert "x: field 'prompt': prompt too long" in str(info.value) and "y: field 'prompt'" in str(info.value)


def test_max_length_must_be_positive():
    with pytest.raises(ConfigError, match="max_length must be a positive integer"):
        TokenizationSettings(max_length=0)


class MergingTokenizer:
    """The tiny tokenizer, except that the full render fuses the last prompt token with the first answer token,
    as a BPE vocabulary can; tokenization must then fall back to tokenizing the answer's text."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        out = self.inner.apply_chat_template(messages, **kwargs)
        if kwargs.get("tokenize") and messages[-1]["role"] == "assistant":
            n = len(render(self.inner, messages[:-1], add_generation_prompt=True))
            out = out[: n - 1] + [999] + out[n + 1:]
        return out


def test_falls_back_to_the_answer_text_when_tokens_merge_across_the_boundary(tiny_tokenizer):
    pair = PreferencePair(id="a", prompt=[{"role": "user", "content": "Hi"}], chosen="Yes", rejected="No")
    plain = tokenize_pair(pair, tiny_tokenizer, TokenizationSettings())
    merged = tokenize_pair(pair, MergingTokenizer(tiny_tokenizer), TokenizationSettings())
    assert merged == plain


def test_validate_with_a_tokenizer_reports_rows_that_do_not_fit(tiny_tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "Hi", "chosen": "Yes", "rejected": "No"}, {"prompt": "Hi " * 50, "chosen": "Yes", "rejected": "No"},
            {"prompt": "Hi", "chosen": "Yes<|im_end|>", "rejected": "No"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(p.line, p.field) for p in validate(path, tokenizer=tiny_tokenizer)] == [(3, "chosen")]
    problems = validate(path, tokenizer=tiny_tokenizer, max_length=100)
    assert [(p.line, p.field) for p in problems] == [(2, "prompt"), (3, "chosen")]
    assert problems[0].reason.startswith("prompt too long to leave room for the completion (prompt ")


def test_a_template_that_rejects_the_conversation_is_a_pair_problem(tiny_tokenizer):
    import copy

    strict = copy.deepcopy(tiny_tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    pair = PreferencePair(id="a", prompt=[SYSTEM, {"role": "user", "content": "Hi"}], chosen="Yes", rejected="No")
    with pytest.raises(PairTokenizationError) as info:
        tokenize_pair(pair, strict, TokenizationSettings())
    assert (info.value.field, info.value.reason) == (None, "the chat template rejects this conversation: no system role")
