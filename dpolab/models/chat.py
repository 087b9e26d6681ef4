"""What every inference backend shares: the `ChatModel` protocol the probes ask of a model, and `ChatFormat`, the
tokenizer side of a chat model (chat template, end-of-turn token, candidate tokens, decoding a reply).

Backends (`dpolab.models.backends`) differ in how they run the network; they format prompts and read replies
with the same `ChatFormat`, so the same conversation is the same token ids whichever backend runs it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dpolab.models.scoring import TextScore

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}
Conversation = list[Message]


@dataclass(frozen=True)
class Generation:
    """One generated assistant reply."""

    text: str  # raw decoded reply, without the end-of-turn token; never escaped or stripped
    n_tokens: int  # tokens generated, not counting the end-of-turn token
    hit_limit: bool  # True when max_new_tokens stopped it before the end-of-turn token


@runtime_checkable
class ChatModel(Protocol):
    """What a probe needs from a model. Conversations are lists of {"role", "content"} messages."""

    name: str

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """The assistant's next reply to each conversation, in input order."""
        ...

    def score_continuations(
        self, conversations: Sequence[Conversation], continuations: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Summed log p(text | conversation) of each candidate assistant reply text, per conversation."""
        ...

    def next_token_logprobs(
        self, conversations: Sequence[Conversation], candidates: Sequence[str], *, prefix: str = ""
    ) -> list[list[float]]:
        """log p of each candidate (a single token such as "A" or "3") as the first token of the reply
        (after `prefix`, if given), per conversation."""
        ...

    def score_texts(self, texts: Sequence[str]) -> list[TextScore]:
        """Summed log-prob of raw texts (no chat template), for perplexity."""
        ...

    def token_count(self, text: str) -> int:
        """Tokens in a text under this model's tokenizer."""
        ...


# Tokens that close an assistant turn in common chat templates, tried before the template is probed.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def end_of_turn_id(tokenizer) -> int:
    """The token id that closes an assistant turn in the tokenizer's chat template.

    Found by rendering a one-turn conversation and taking the first special token after the assistant text;
    falls back to well-known names, then to eos.
    """
    marker = "dpolab-probe-reply"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    tail = text[text.rfind(marker) + len(marker):]
    special = set(tokenizer.all_special_ids)
    for tok in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if tok in special:
            return tok
    vocab = tokenizer.get_vocab()
    for name in _END_OF_TURN_TOKENS:
        if name in vocab:
            return vocab[name]
    return tokenizer.eos_token_id


class ChatFormat:
    """A tokenizer with a chat template, as the backends use it: prompts as token ids, the tokens that end a
    reply, single-token candidates, and a reply decoded from generated ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end_of_turn_id = end_of_turn_id(tokenizer)
        stops = [self.end_of_turn_id]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
            stops.append(tokenizer.eos_token_id)
        self.stop_ids = stops
        pad = tokenizer.pad_token_id
        self.pad_id = self.end_of_turn_id if pad is None else pad

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, conversation: Conversation, *, prefix: str = "") -> list[int]:
        """Token ids of the conversation with the assistant generation prompt (and an optional reply prefix)."""
        text = self.tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=False)
        return self.ids(text + prefix)

    def token_count(self, text: str) -> int:
        return len(self.ids(text))

    def candidate_ids(self, candidates: Sequence[str]) -> list[int]:
        """The single token id of each candidate string; refuses candidates that are not one distinct token."""
        ids = []
        for c in candidates:
            toks = self.ids(c)
            if len(toks) != 1:
                raise ValueError(f"candidate {c!r} is {len(toks)} tokens under this tokenizer, not one")
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidates {list(candidates)} do not map to distinct tokens")
        return ids

    def continuation_rows(self, conversations: Sequence[Conversation],
                          continuations: Sequence[Sequence[str]]) -> tuple[list[list[int]], list[int]]:
        """For engines that score whole sequences: each candidate as prompt + continuation ids, flattened in order,
        and the number of continuation tokens of each (whose log-probs make its score)."""
        if len(conversations) != len(continuations):
            raise ValueError("one list of continuations per conversation")
        rows, spans = [], []
        for conv, texts in zip(conversations, continuations):
            prompt = self.prompt_ids(conv)
            for text in texts:
                cont = self.ids(text)
                rows.append(prompt + cont)
                spans.append(len(cont))
        return rows, spans

    def reply(self, new_tokens: Sequence[int], max_new_tokens: int) -> Generation:
        """The reply in generated ids: everything before the first stop token, decoded without touching it."""
        stop = next((j for j, t in enumerate(new_tokens) if t in self.stop_ids), None)
        kept = list(new_tokens if stop is None else new_tokens[:stop])
        text = self.tokenizer.decode(kept, skip_special_tokens=False)
        return Generation(text=text, n_tokens=len(kept), hit_limit=stop is None and len(kept) >= max_new_tokens)


def regroup(flat: Sequence[float], continuations: Sequence[Sequence[str]]) -> list[list[float]]:
    """Flattened scores (in `ChatFormat.continuation_rows` order) back into one list per conversation."""
    out, k = [], 0
    for texts in continuations:
        out.append(list(flat[k:k + len(texts)]))
        k += len(texts)
    return out
