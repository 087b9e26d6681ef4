"""The `hf` inference backend: batched chat generation and scoring on the PyTorch model itself.

`HFChatModel` wraps a Hugging Face causal LM: prompts are formatted with the tokenizer's chat template, sorted by
length, left-padded into batches and decoded by `model.generate` with its KV cache, stopping at the template's
end-of-turn token. Greedy by default; sampling is seeded. Scoring (continuations, next-token candidates, raw text)
runs through `dpolab.models.scoring` on the same batching.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from dpolab.models import scoring
from dpolab.models.chat import ChatFormat, ChatModel, Conversation, Generation, Message, end_of_turn_id  # noqa: F401
from dpolab.models.scoring import TextScore

class PrefixCache:
    """Keys and values of recent conversations, by token ids, so a longer conversation that starts with one of
    them (the next turn of a dialogue, a stance check on it) only runs its new tokens.

    A lookup returns the entry with the longest common prefix, so a reply whose decoded text re-tokenizes
    differently still reuses everything before the first differing token: results equal a full recomputation
    up to floating-point rounding. Entries that a new entry extends are dropped; beyond `max_bytes` the least
    recently used go.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: dict[int, tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]], int]] = {}
        self._clock = 0
        self._used: dict[int, int] = {}
        self.hits = 0  # tokens served from the cache
        self.misses = 0  # tokens that had to run

    @property
    def nbytes(self) -> int:
        return sum(e[2] for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._used.clear()

    def _longest(self, row: np.ndarray) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with `row` (leaving at least one token of it) and that length."""
        best, best_len = None, 0
        for key, (eids, kv, _) in self._entries.items():
            m = min(len(eids), len(row) - 1)
            if m <= best_len:
                continue
            diff = np.flatnonzero(eids[:m] != row[:m])
            n = int(diff[0]) if diff.size else m
            if n > best_len:
                best, best_len = key, n
        return best, best_len

    def covers(self, ids: Sequence[int]) -> bool:
        """Whether all of `ids` is already cached (as an entry or the start of one); counts no hit or miss."""
        row = np.asarray([*ids, -1], dtype=np.int64)
        return self._longest(row)[1] == len(ids)

    def lookup(self, ids: Sequence[int]) -> scoring.Prefix | None:
        """The longest cached prefix of `ids`, leaving at least one token to run; None when nothing matches."""
        row = np.asarray(ids, dtype=np.int64)
        best, best_len = self._longest(row)
        if best is None:
            self.misses += len(row)
            return None
        self._clock += 1
        self._used[best] = self._clock
        self.hits += best_len
        self.misses += len(row) - best_len
        return scoring.Prefix(kv=self._entries[best][1], length=best_len)

    def add(self, ids: Sequence[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Remember the keys and values of `ids` (per layer, each (H, len(ids), D))."""
        row = np.asarray(ids, dtype=np.int64)
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        for key in [k for k, (eids, _, _) in self._entries.items()
                    if len(eids) <= len(row) and np.array_equal(eids, row[: len(eids)])]:
            self._drop(key)
        while self._entries and self.nbytes + nbytes > self.max_bytes:
            self._drop(min(self._used, key=self._used.__getitem__))
        self._clock += 1
        self._entries[self._clock] = (row, kv, nbytes)
        self._used[self._clock] = self._clock

    def _drop(self, key: int) -> None:
        self._entries.pop(key, None)
        self._used.pop(key, None)


SHARED_MIN_TOKENS = 48  # a shared prefix shorter than this is not worth its own forward pass


def shared_prefixes(prompts: Sequence[Sequence[int]], min_tokens: int) -> list[list[int]]:
    """The longest prefixes that two or more prompts share, at least `min_tokens` long, each leaving every prompt
    that has it at least one token of its own; none is the start of another (the cache finds shorter ones in the
    longer). Prompts in lexicographic order put each prompt beside the one it shares most with."""
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    found = set()
    for a, b in zip(order, order[1:]):
        x, y = prompts[a], prompts[b]
        m = min(len(x), len(y)) - 1
        n = next((j for j in range(m) if x[j] != y[j]), m)
        if n >= min_tokens:
            found.add(tuple(x[:n]))
    keep = sorted(found)
    return [list(p) for p, nxt in zip(keep, [*keep[1:], None]) if nxt is None or nxt[:len(p)] != p]


class HFChatModel:
    """A Hugging Face causal LM and tokenizer as a `ChatModel`.

    loaded: from `dpolab.models.load_model` (anything with .model, .tokenizer, .name).
    batch_size: conversations per `generate` call; larger is faster on CPU until padding and memory bite.
    score_batch_size: sequences per scoring forward pass.
    prefix_cache_bytes: memory for keys and values of earlier conversations (`PrefixCache`); a dialogue's
        next turn and its stance checks then run only their new tokens. 0 turns it off.
    """

    def __init__(self, loaded, *, batch_size: int = 32, score_batch_size: int = 32,
                 prefix_cache_bytes: int = 3 << 30):
        self.model = loaded.model.eval()
        self.format = ChatFormat(loaded.tokenizer)
        self.name = loaded.name
        self.backend = "hf"
        self.batch_size = batch_size
        self.score_batch_size = score_batch_size
        plain = _plain_cache(self.model)
        self.cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 and plain else None
        self.grow_in_place = plain  # decode into scoring.growing_cache (no per-step copy of the whole cache)

    @classmethod
    def load(cls, name: str, *, dtype: str = "float32", batch_size: int = 32, **kwargs) -> HFChatModel:
        """Load a model by built-in name or folder (see `dpolab.models.load_model`) and wrap it."""
        from dpolab.models.load import load_model

        return cls(load_model(name, dtype=dtype), batch_size=batch_size, **kwargs)

    def clear_cache(self) -> None:
        """Forget cached prefixes (frees their memory)."""
        if self.cache is not None:
            self.cache.clear()

    def token_count(self, text: str) -> int:
        return self.format.token_count(text)

    def _prefixes(self, prompts: Sequence[Sequence[int]]) -> list[scoring.Prefix | None] | None:
        return [self.cache.lookup(p) for p in prompts] if self.cache is not None else None

    def _share(self, prompts: Sequence[Sequence[int]]) -> None:
        """Run once, and cache, each long prefix that several of these prompts share and the cache lacks, so
        that their lookups find it: the stigma probe's eight questions on one vignette run the vignette once."""
        if self.cache is None:
            return
        rows = [r for r in shared_prefixes(prompts, SHARED_MIN_TOKENS) if not self.cache.covers(r)]
        with torch.inference_mode():
            for batch in scoring.batches([len(r) for r in rows], self.score_batch_size):
                packed = scoring.pack([rows[i] for i in batch], self.format.pad_id)
                past = scoring.run_new(self.model, packed, use_cache=True, logits_to_keep=1).past_key_values
                layers = [(layer.keys, layer.values) for layer in past.layers]
                for b, i in enumerate(batch):
                    idx = packed.mask[b].nonzero().squeeze(-1)  # (len(row),) the row's own columns
                    self.cache.add(rows[i], [(k[b].index_select(1, idx), v[b].index_select(1, idx))
                                             for k, v in layers])

    # -- generation --------------------------------------------------------------------------------------------

    def _generation_config(self, max_new_tokens: int, do_sample: bool, temperature: float):
        from transformers import GenerationConfig

        sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=self.format.stop_ids,
            pad_token_id=self.format.pad_id,
            use_cache=True,
            return_dict_in_generate=True,
            **sampling,
        )

    def _remember(self, packed: scoring.Packed, rows: list[list[int]], new: list[list[int]], past) -> None:
        """Store each row's prompt and reply (through its end-of-turn token) with their keys and values."""
        width = packed.ids.shape[1]
        fed = past.get_seq_length() - width  # generated tokens whose keys and values are in the cache
        layers = [(layer.keys, layer.values) for layer in past.layers]
        for b, (row, gen) in enumerate(zip(rows, new)):
            stop = next((j for j, t in enumerate(gen) if t in self.format.stop_ids), len(gen) - 1)
            g = min(stop + 1, fed)
            idx = torch.cat([packed.mask[b].nonzero().squeeze(-1), width + torch.arange(g)])  # (len(row) + g,)
            kv = [(k[b].index_select(1, idx), v[b].index_select(1, idx)) for k, v in layers]  # (H, L, D) each
            self.cache.add(row + gen[:g], kv)

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
        prompts = [self.format.prompt_ids(c) for c in conversations]
        prefixes = self._prefixes(prompts)  # all looked up before any is stored: a batch may evict a shared one
        config = self._generation_config(max_new_tokens, do_sample, temperature)
        out: list[Generation | None] = [None] * len(prompts)
        rng = torch.random.fork_rng(devices=[]) if do_sample else contextlib.nullcontext()
        with rng, torch.inference_mode():
            if do_sample:
                torch.manual_seed(0 if seed is None else seed)
            for batch in scoring.batches([len(p) for p in prompts], self.batch_size):
                rows = [prompts[i] for i in batch]
                packed = scoring.pack(rows, self.format.pad_id, config=self.model.config,
                                      prefixes=[prefixes[i] for i in batch] if prefixes else None)
                past = packed.past
                if past is None and self.grow_in_place:
                    past = scoring.growing_cache(self.model.config)
                res = self.model.generate(input_ids=packed.ids, attention_mask=packed.mask, position_ids=packed.pos,
                                          past_key_values=past, generation_config=config)
                new = res.sequences[:, packed.ids.shape[1]:].tolist()  # (B, <= max_new_tokens)
                for b, i in enumerate(batch):
                    out[i] = self.format.reply(new[b], max_new_tokens)
                if self.cache is not None:
                    self._remember(packed, rows, new, res.past_key_values)
        return out  # type: ignore[return-value]

    # -- scoring -----------------------------------------------------------------------------------------------

    def score_continuations(
        self, conversations: Sequence[Conversation], continuations: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        if len(conversations) != len(continuations):
            raise ValueError("one list of continuations per conversation")
        prompts = [self.format.prompt_ids(c) for c in conversations]
        conts = [[self.format.ids(t) for t in texts] for texts in continuations]
        self._share(prompts)
        return scoring.grouped_continuation_logprobs(self.model, prompts, conts, pad_id=self.format.pad_id,
                                                     batch_size=self.score_batch_size,
                                                     prefixes=self._prefixes(prompts))

    def next_token_logprobs(
        self, conversations: Sequence[Conversation], candidates: Sequence[str], *, prefix: str = ""
    ) -> list[list[float]]:
        cand = self.format.candidate_ids(candidates)
        prompts = [self.format.prompt_ids(c, prefix=prefix) for c in conversations]
        self._share(prompts)
        return scoring.next_token_logprobs(self.model, prompts, cand, pad_id=self.format.pad_id,
                                           batch_size=self.score_batch_size, prefixes=self._prefixes(prompts))

    def score_texts(self, texts: Sequence[str]) -> list[TextScore]:
        rows = [self.format.ids(t) for t in texts]
        return scoring.text_scores(self.model, rows, pad_id=self.format.pad_id, batch_size=max(1, self.score_batch_size // 8))


def _plain_cache(model) -> bool:
    """Whether the model's KV cache is plain full attention (no sliding window or recurrent state), which is
    what the prefix cache knows how to cut and stack."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a model whose config the cache cannot read: run without the prefix cache
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class _HFBackend:
    """The `hf` entry of dpolab.models.backends.BACKENDS: the PyTorch model as loaded, on any device and dtype."""

    name = "hf"

    def unavailable(self, loaded, *, int8: bool) -> str | None:
        return "it runs the weights as loaded, not in int8" if int8 else None

    def wrap(self, loaded, *, batch_size: int, int8: bool = False) -> HFChatModel:
        return HFChatModel(loaded, batch_size=batch_size)


BACKEND = _HFBackend()
