"""Batched chat generation behind `ChatModel`, the one Protocol every probe asks of a model.

`HFChatModel` wraps a Hugging Face causal LM: prompts are formatted with the tokenizer's chat template, sorted by
length, left-padded into batches and decoded by `model.generate` with its KV cache, stopping at the template's
end-of-turn token. Greedy by default; sampling is seeded. Scoring (continuations, next-token candidates, raw text)
runs through `dpolab.models.scoring` on the same batching.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from dpolab.models import scoring
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


class HFChatModel:
    """A Hugging Face causal LM and tokenizer as a `ChatModel`.

    loaded: from `dpolab.models.load_model` (anything with .model, .tokenizer, .name).
    batch_size: conversations per `generate` call; larger is faster on CPU until padding and memory bite.
    score_batch_size: sequences per scoring forward pass.
    share_prefix: score the candidate replies of a conversation on one KV cache of the conversation
        (`scoring.grouped_continuation_logprobs`) instead of re-running the conversation for each candidate.
    """

    def __init__(self, loaded, *, batch_size: int = 16, score_batch_size: int = 32, share_prefix: bool = True):
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.batch_size = batch_size
        self.score_batch_size = score_batch_size
        self.share_prefix = share_prefix
        self.end_of_turn_id = end_of_turn_id(self.tokenizer)
        stops = [self.end_of_turn_id]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in stops:
            stops.append(self.tokenizer.eos_token_id)
        self.stop_ids = stops
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.end_of_turn_id if pad is None else pad

    @classmethod
    def load(cls, name: str, *, dtype: str = "float32", batch_size: int = 16, **kwargs) -> HFChatModel:
        """Load a model by built-in name or folder (see `dpolab.models.load_model`) and wrap it."""
        from dpolab.models.load import load_model

        return cls(load_model(name, dtype=dtype, **kwargs), batch_size=batch_size)

    # -- tokenization ------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, conversation: Conversation, *, prefix: str = "") -> list[int]:
        """Token ids of the conversation with the assistant generation prompt (and an optional reply prefix)."""
        text = self.tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=False)
        return self._ids(text + prefix)

    def token_count(self, text: str) -> int:
        return len(self._ids(text))

    # -- generation --------------------------------------------------------------------------------------------

    def _generation_config(self, max_new_tokens: int, do_sample: bool, temperature: float):
        from transformers import GenerationConfig

        sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            **sampling,
        )

    def _finish(self, new_tokens: list[int], max_new_tokens: int) -> Generation:
        stop = next((j for j, t in enumerate(new_tokens) if t in self.stop_ids), None)
        kept = new_tokens if stop is None else new_tokens[:stop]
        text = self.tokenizer.decode(kept, skip_special_tokens=False)
        return Generation(text=text, n_tokens=len(kept), hit_limit=stop is None and len(kept) >= max_new_tokens)

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """Replies in input order. Sampling draws from torch's RNG seeded with `seed` (the global RNG is restored
        afterwards), so the same inputs, batch size and seed give the same samples."""
        if not conversations:
            return []
        prompts = [self.prompt_ids(c) for c in conversations]
        config = self._generation_config(max_new_tokens, do_sample, temperature)
        out: list[Generation | None] = [None] * len(prompts)
        rng = torch.random.fork_rng(devices=[]) if do_sample else contextlib.nullcontext()
        with rng, torch.inference_mode():
            if do_sample:
                torch.manual_seed(0 if seed is None else seed)
            for batch in scoring._batches(scoring._by_length([len(p) for p in prompts]), self.batch_size):
                ids, mask = scoring.left_pad([prompts[i] for i in batch], self.pad_id)  # (B, T)
                generated = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                new = generated[:, ids.shape[1]:].tolist()  # (B, <= max_new_tokens)
                for b, i in enumerate(batch):
                    out[i] = self._finish(new[b], max_new_tokens)
        return out  # type: ignore[return-value]

    # -- scoring -----------------------------------------------------------------------------------------------

    def score_continuations(
        self, conversations: Sequence[Conversation], continuations: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        if len(conversations) != len(continuations):
            raise ValueError("one list of continuations per conversation")
        prompts = [self.prompt_ids(c) for c in conversations]
        conts = [[self._ids(t) for t in texts] for texts in continuations]
        if self.share_prefix:
            return scoring.grouped_continuation_logprobs(self.model, prompts, conts, pad_id=self.pad_id,
                                                         batch_size=self.score_batch_size)
        flat_p = [p for p, cs in zip(prompts, conts) for _ in cs]
        flat = iter(scoring.continuation_logprobs(self.model, flat_p, [c for cs in conts for c in cs],
                                                  pad_id=self.pad_id, batch_size=self.score_batch_size))
        return [[next(flat) for _ in cs] for cs in conts]

    def candidate_ids(self, candidates: Sequence[str]) -> list[int]:
        """The single token id of each candidate string; refuses candidates that are not one distinct token."""
        ids = []
        for c in candidates:
            toks = self._ids(c)
            if len(toks) != 1:
                raise ValueError(f"candidate {c!r} is {len(toks)} tokens under this tokenizer, not one")
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidates {list(candidates)} do not map to distinct tokens")
        return ids

    def next_token_logprobs(
        self, conversations: Sequence[Conversation], candidates: Sequence[str], *, prefix: str = ""
    ) -> list[list[float]]:
        cand = self.candidate_ids(candidates)
        prompts = [self.prompt_ids(c, prefix=prefix) for c in conversations]
        return scoring.next_token_logprobs(self.model, prompts, cand, pad_id=self.pad_id,
                                           batch_size=self.score_batch_size)

    def score_texts(self, texts: Sequence[str]) -> list[TextScore]:
        rows = [self._ids(t) for t in texts]
        return scoring.text_scores(self.model, rows, pad_id=self.pad_id, batch_size=max(1, self.score_batch_size // 8))
