"""Tokenization: a PreferencePair -> prompt / chosen / rejected token ids, rendered with the model's chat template.

Rendering. prompt_ids = chat_template(prompt, add_generation_prompt=True): the prompt exactly as generation sees
it, ending with the assistant header. A completion's ids are chat_template(prompt + [assistant answer]) minus
that prefix, cut right after the end-of-turn token (so SmolLM2's trailing "\\n" after `<|im_end|>` is dropped and
every completion ends with end_of_turn_id). The end-of-turn token is also the pad token in SmolLM2: downstream
code must build masks from lengths, never by comparing against the pad id.

Truncation policy. A pair's sequences are capped at `max_length` tokens, counting the prompt plus the longer of
its two completions. Completions are never cut. When a pair is too long, tokens are dropped from the LEFT of the
prompt, so the prompt keeps its end; but never from inside its last message and the assistant header that
follows it (the final user turn and the generation prompt are always kept whole). A one-message prompt is
therefore never cut, including anything the template puts before it (such as a default system prompt). If the
prompt cannot be cut enough under that rule, the pair is invalid ("prompt too long to leave room for the
completion"), and `dpolab data validate --model M --max-length L` lists it; a completion alone longer than
max_length is invalid too. Truncated prompts are counted (TokenizedData.n_prompt_truncated) for the trainer's log.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from jinja2 import TemplateError

from dpolab.data.schema import PreferencePair, format_problems
from dpolab.errors import ConfigError, DataError

# Bump when the rendering or truncation rules change: it is part of the reference-log-prob cache key.
TOKENIZATION_VERSION = 1


@dataclass
class TokenizedPair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion tokens only, ending with the end-of-turn token
    rejected_ids: list[int]
    prompt_truncated: int  # tokens dropped from the left of the prompt (0 if none)
    weight: float
    score_chosen: float | None
    score_rejected: float | None
    chosen_weights: list[float] | None = None  # per completion token, when emphasis spans weight them (else 1 each)
    rejected_weights: list[float] | None = None
    nullified_prompt_ids: list[int] | None = None  # the counterfactual prompt (meta.nullified_prompt), when asked for


@dataclass(frozen=True)
class TokenizationSettings:
    """How pairs become token ids; part of the reference-log-prob cache key.

    max_length: cap on prompt + the longer completion, in tokens; the prompt is cut from the left to fit.
        None: no cap (validation uses it to check the template alone).
    emphasis: token-weighted log-probs (`emphasis_weights`): the weight of a completion token inside one of its
        pair's emphasis spans; 1 keeps plain summed log-probs and ignores the spans.
    counterfactual: also tokenize each pair's `meta.nullified_prompt` (the prompt with a partner's intervention
        made uninformative), for the counterfactual-consistency term (dpolab.losses.consistency).
    """

    max_length: int | None = 1024
    emphasis: float = 1.0
    counterfactual: bool = False

    def __post_init__(self):
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1):
            raise ConfigError(f"max_length must be a positive integer, got {self.max_length!r}")
        if not self.emphasis > 0:
            raise ConfigError(f"emphasis must be > 0, got {self.emphasis!r}")

    def key(self) -> dict:
        """What the token ids and weights depend on. `counterfactual` is left out (it adds a prompt that the
        reference never scores), and `emphasis` only when it weights, so plain runs keep their cached references."""
        key = {"max_length": self.max_length, "version": TOKENIZATION_VERSION}
        return key if self.emphasis == 1.0 else {**key, "emphasis": self.emphasis}


@dataclass
class TokenizedData:
    pairs: list[TokenizedPair]
    n_prompt_truncated: int  # pairs whose prompt lost tokens on the left
    fingerprint: str  # sha256 over settings + every pair's id and token ids: a cache key for reference log-probs


class PairTokenizationError(DataError):
    """One pair cannot be tokenized under the settings (too long, or the template misbehaves)."""

    def __init__(self, pair: PreferencePair, field: str | None, reason: str):
        self.pair, self.field, self.reason = pair, field, reason
        what = f"field '{field}': " if field else ""
        super().__init__(f"{pair.source or pair.id}: {what}{reason}")


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool, tokenize: bool = True):
    # transformers 5 returns a BatchEncoding unless return_dict=False.
    out = tokenizer.apply_chat_template(messages, tokenize=tokenize, return_dict=False, add_generation_prompt=add_generation_prompt)
    return list(out) if tokenize else out


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the chat template (`<|im_end|>` for ChatML).

    It is the one generation stops at: both come from dpolab.models.generate, so what training teaches the model
    to emit and what generation waits for cannot drift apart.
    """
    from dpolab.models.chat import end_of_turn_id as find  # lazy: only needed once a tokenizer (and torch) is loaded

    try:
        return find(tokenizer)
    except (TemplateError, ValueError) as exc:
        raise DataError(f"the chat template cannot render a user + assistant exchange: {exc}") from None


def _completion_ids(tokenizer, pair: PreferencePair, name: str, prompt_ids: list[int], eot: int) -> list[int]:
    messages = pair.prompt + [{"role": "assistant", "content": getattr(pair, name)}]
    full = _render(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt_ids)] == prompt_ids:
        tail = full[len(prompt_ids):]
    else:
        # BPE can merge tokens across the prompt/answer boundary, so the token prefix may differ even though the
        # text prefix matches. Fall back to tokenizing the answer's text on its own: prompt_ids stay exactly what
        # generation sees, at the cost of the answer's first token possibly differing from the joint render.
        prompt_text = _render(tokenizer, pair.prompt, add_generation_prompt=True, tokenize=False)
        full_text = _render(tokenizer, messages, add_generation_prompt=False, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise PairTokenizationError(pair, name, "the chat template renders the prompt differently once an answer follows it; "
                                        "dpolab needs the prompt render to be a prefix of the full conversation")
        tail = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    n_eot = tail.count(eot)
    if n_eot != 1:
        token = tokenizer.convert_ids_to_tokens(eot)
        reason = "the answer contains" if n_eot else "the chat template did not end the answer with"
        raise PairTokenizationError(pair, name, f"{reason} the end-of-turn token {token!r}")
    return tail[: tail.index(eot) + 1]


EMPHASIS_KEY = "emphasis"  # meta["emphasis"] = {"chosen": [[start, end], ...], "rejected": [...]}, character spans


def emphasis_weights(tokenizer, pair: PreferencePair, name: str, completion: list[int], weight: float) -> list[float] | None:
    """Per-token weights of one completion for token-weighted DPO: `weight` for each token that overlaps one of the
    pair's emphasis spans of this completion (character offsets into its text, end exclusive), 1 for the others
    (the end-of-turn token included). None when the pair marks no span in this completion.

    The weighted sequence log-prob is sum_t w_t log p(y_t | x, y_<t), for the policy and the reference alike, so
    the DPO margin counts the marked tokens `weight` times. Suppression of a named pattern marks the sentences that
    the chosen reply lost; with every weight 1 this is plain DPO.
    """
    spans = (pair.meta.get(EMPHASIS_KEY) or {}).get(name)
    if not spans:
        return None
    field = f"meta.{EMPHASIS_KEY}.{name}"
    text = getattr(pair, name)
    for span in spans:
        if (not isinstance(span, (list, tuple)) or len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                or not 0 <= span[0] < span[1] <= len(text)):
            raise PairTokenizationError(pair, field, f"each span must be [start, end] with 0 <= start < end <= "
                                        f"{len(text)} (the {name} text's length), got {span!r}")
    prompt_text = _render(tokenizer, pair.prompt, add_generation_prompt=True, tokenize=False)
    full_text = _render(tokenizer, pair.prompt + [{"role": "assistant", "content": text}], add_generation_prompt=False,
                        tokenize=False)
    tail = full_text[len(prompt_text):]
    start = tail.find(text)
    enc = tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)
    if start < 0 or list(enc["input_ids"][: len(completion)]) != list(completion):
        raise PairTokenizationError(pair, field, "the completion's tokens cannot be matched to its characters under "
                                    "this tokenizer and chat template, so its spans cannot be weighted")
    out = []
    for a, b in enc["offset_mapping"][: len(completion)]:
        a, b = a - start, b - start
        out.append(weight if any(a < e and s < b for s, e in spans) else 1.0)
    return out


NULLIFIED_KEY = "nullified_prompt"  # meta["nullified_prompt"] = [{"role", "content"}, ...], like `prompt`


def nullified_prompt_ids(tokenizer, pair: PreferencePair, budget: int | None) -> list[int] | None:
    """The pair's counterfactual prompt as generation sees it, cut from the left to `budget` tokens like the real
    prompt; None when the pair has none."""
    messages = pair.meta.get(NULLIFIED_KEY)
    if messages is None:
        return None
    field = f"meta.{NULLIFIED_KEY}"
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise PairTokenizationError(pair, field, "must be a non-empty list of {role, content} messages, like prompt")
    ids = _render(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages], add_generation_prompt=True)
    if budget is not None and len(ids) > budget:
        if budget < _uncuttable_prompt_tokens(tokenizer, messages, ids):
            raise PairTokenizationError(pair, field, f"too long to leave room for the completion ({len(ids)} tokens, "
                                        f"{budget} left by max_length)")
        ids = ids[len(ids) - budget:]
    return ids


def _uncuttable_prompt_tokens(tokenizer, prompt: list[dict], prompt_ids: list[int]) -> int:
    """How many prompt tokens at the end are protected: the last message plus the generation prompt."""
    if len(prompt) < 2:
        return len(prompt_ids)
    try:
        head = _render(tokenizer, prompt[:-1], add_generation_prompt=False)
    except (TemplateError, ValueError):  # a template that refuses a conversation ending with an assistant turn
        return len(prompt_ids)
    if prompt_ids[: len(head)] != head:
        return len(prompt_ids)
    return len(prompt_ids) - len(head)


def tokenize_pair(pair: PreferencePair, tokenizer, settings: TokenizationSettings, *, eot: int | None = None) -> TokenizedPair:
    """Tokenize one pair; raises PairTokenizationError (a DataError) if it cannot fit max_length.

    eot: end_of_turn_id(tokenizer), when the caller has it already (it costs one template render).
    """
    eot = end_of_turn_id(tokenizer) if eot is None else eot
    max_length = settings.max_length
    try:
        prompt_ids = _render(tokenizer, pair.prompt, add_generation_prompt=True)
        chosen_ids = _completion_ids(tokenizer, pair, "chosen", prompt_ids, eot)
        rejected_ids = _completion_ids(tokenizer, pair, "rejected", prompt_ids, eot)
    except (TemplateError, ValueError) as exc:  # templates may raise_exception() on role orders they do not allow
        raise PairTokenizationError(pair, None, f"the chat template rejects this conversation: {exc}") from None
    longest = max(len(chosen_ids), len(rejected_ids))
    dropped = 0
    if max_length is not None and len(prompt_ids) + longest > max_length:
        if longest >= max_length:
            name = "chosen" if len(chosen_ids) >= len(rejected_ids) else "rejected"
            raise PairTokenizationError(pair, name, f"completion too long ({longest} tokens, max_length {max_length}); "
                                        "completions are never truncated")
        budget = max_length - longest
        if budget < _uncuttable_prompt_tokens(tokenizer, pair.prompt, prompt_ids):
            raise PairTokenizationError(pair, "prompt", "prompt too long to leave room for the completion "
                                        f"(prompt {len(prompt_ids)} tokens, completion {longest} tokens, max_length {max_length})")
        dropped = len(prompt_ids) - budget
        prompt_ids = prompt_ids[dropped:]
    return TokenizedPair(
        id=pair.id,
        prompt_ids=prompt_ids,
        chosen_ids=chosen_ids,
        rejected_ids=rejected_ids,
        prompt_truncated=dropped,
        weight=pair.weight,
        score_chosen=pair.score_chosen,
        score_rejected=pair.score_rejected,
        chosen_weights=None if settings.emphasis == 1.0 else
        emphasis_weights(tokenizer, pair, "chosen", chosen_ids, settings.emphasis),
        rejected_weights=None if settings.emphasis == 1.0 else
        emphasis_weights(tokenizer, pair, "rejected", rejected_ids, settings.emphasis),
        nullified_prompt_ids=nullified_prompt_ids(
            tokenizer, pair, None if max_length is None else max_length - longest) if settings.counterfactual else None,
    )


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, settings: TokenizationSettings) -> TokenizedData:
    """Tokenize every pair; raises one DataError listing every pair that cannot be tokenized."""
    eot = end_of_turn_id(tokenizer)
    out, errors = [], []
    for pair in pairs:
        try:
            out.append(tokenize_pair(pair, tokenizer, settings, eot=eot))
        except PairTokenizationError as exc:
            errors.append(exc)
    if errors:
        raise DataError(f"{len(errors)} of {len(pairs)} pairs cannot be tokenized (check them first with "
                        f"`dpolab data validate FILE --model M --max-length {settings.max_length}`):\n{format_problems(errors)}")
    return tokenized_data(out, settings)


def tokenized_data(pairs: list[TokenizedPair], settings: TokenizationSettings) -> TokenizedData:
    """Tokenized pairs with their truncation count and fingerprint (settings + every pair's id and token ids)."""
    digest = hashlib.sha256(json.dumps(settings.key(), sort_keys=True).encode())
    for t in pairs:
        weights = [t.chosen_weights, t.rejected_weights] if t.chosen_weights or t.rejected_weights else []
        digest.update(json.dumps([t.id, t.prompt_ids, t.chosen_ids, t.rejected_ids, *weights]).encode())
    return TokenizedData(pairs=pairs, n_prompt_truncated=sum(t.prompt_truncated > 0 for t in pairs),
                         fingerprint=digest.hexdigest())
