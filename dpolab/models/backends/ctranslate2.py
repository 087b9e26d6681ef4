"""The `ctranslate2` inference backend: the model's weights converted once into CTranslate2's format, and each
request run by whichever engine does it faster, behind the same `ChatModel` protocol as the PyTorch backend.

What runs is the same model: the conversion keeps float32 weights and `compute_type="float32"`; 8-bit weights are
only used when asked (`int8=True`) and the model's `backend` then says `ctranslate2 int8`. Converted models are
cached under $DPOLAB_HOME/ctranslate2, keyed by the weights themselves (as the reference log-probs are), so a
trained cell's model is converted once and a resumed run reuses it.

Which engine runs what (`scoring="torch"`, the default). CTranslate2 keeps no prompt cache across calls, so it
re-runs a whole conversation for every call on it, while the PyTorch path (`HFChatModel`) keeps the keys and
values of earlier turns and scores several candidates after one shared prompt pass. Measured on the persuasion
probe (8 items, SmolLM2-135M, AMD EPYC, 2 threads): scoring 736 stance candidates took 215 s in CTranslate2 against
22 s in the PyTorch path, and the multi-turn replies 71 s against 40 s; single-turn batched generation is where
CTranslate2 is faster (64 replies of up to 128 tokens: about 300 tokens/s against 207). So:
- a reply to a conversation with no earlier assistant turn: CTranslate2 (`generate_batch`);
- a reply in a multi-turn dialogue, and every score (continuations, next-token candidates, raw texts): the
  PyTorch path with its prefix cache, on the same weights.
`scoring="ctranslate2"` runs everything in CTranslate2 instead:
- `score_continuations` and `score_texts`: `score_batch` (each token's log-prob given the ones before it);
- `next_token_logprobs`: one generation step with the vocabulary's logits returned (`return_logits_vocab`),
  normalised here in float64. The engine returns logits for every step it fed, the tail of a longer prompt in
  the batch included; the last entry is the first new token's.

Generation: the prompt is forwarded at once (`include_prompt_in_result=False`). The engine forwards a batch's
prompts together only up to the shortest one and feeds the rest token by token, so batches are formed of prompts
within `length_slack` tokens of each other. Decoding a small batch costs about as much per step as a large one
(each step reads every weight), so a few extra steps buy fewer, larger batches: replaying the verbosity probe's
32 replies of up to 256 tokens took 29.6 s with a slack of 16 and 24.7 s with 64 (25.3 s with one batch).
Sampling: CTranslate2 draws from a random generator of its worker
thread, seeded when the thread starts (`set_random_seed` does not reach a running one; OpenNMT/CTranslate2#1757),
so a seeded sampling call runs on a freshly started generator: the same inputs, batch size and seed give the same
samples.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from dpolab.io import atomic_dir, atomic_write_json
from dpolab.models.chat import ChatFormat, Conversation, Generation, regroup
from dpolab.models.load import dpolab_home, weights_fingerprint
from dpolab.models.scoring import TextScore
from dpolab.progress import quiet_library_bars

# Bump when `convert` changes what it writes, so older conversions are made again.
_RECIPE = 1
MARKER = "dpolab-ctranslate2.json"  # written last into a converted folder: what it was made from


def installed() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


def _version() -> str:
    import ctranslate2

    return ctranslate2.__version__


def cache_root() -> Path:
    return dpolab_home() / "ctranslate2"


def conversion_key(model: torch.nn.Module) -> str:
    """The identity of a conversion: the weights, the architecture's config, CTranslate2's version and the recipe."""
    config = model.config.to_dict()
    config.pop("transformers_version", None)
    payload = {"weights": weights_fingerprint(model), "config": config, "ctranslate2": _version(), "recipe": _RECIPE}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _converter(model: torch.nn.Module, tokenizer, config_dir: str):
    from ctranslate2.converters import TransformersConverter

    class InMemory(TransformersConverter):
        """TransformersConverter fed the model in memory (the converter takes modules apart as it goes, so it
        gets a copy; a LoRA model gets its adapters merged into that copy)."""

        def load_model(self, model_class, model_name_or_path, **kwargs):
            plain = copy.deepcopy(model)
            return plain.merge_and_unload() if hasattr(plain, "merge_and_unload") else plain

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return tokenizer

    return InMemory(config_dir)


def converted(model: torch.nn.Module, tokenizer, *, echo=None) -> Path:
    """The CTranslate2 folder of these weights, converting them on first use.

    Concurrent first uses are safe: a file lock serialises the conversion, which is written to a temporary folder
    and renamed into place with its marker written last, so a reader never sees a half-written model.
    """
    key = conversion_key(model)
    root = cache_root()
    final = root / key
    if (final / MARKER).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{key}.lock")):
        if (final / MARKER).exists():  # converted by another process while we waited
            return final
        (echo or _stderr)(f"dpolab: converting the model for CTranslate2 into {final} (once per set of weights)")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        with tempfile.TemporaryDirectory() as config_dir, atomic_dir(final) as tmp:
            base.config.save_pretrained(config_dir)
            with quiet_library_bars():
                _converter(model, tokenizer, config_dir).convert(str(tmp), force=True)
            atomic_write_json(tmp / MARKER, {"key": key, "ctranslate2": _version(), "recipe": _RECIPE})
    return final


def length_groups(lengths: Sequence[int], size: int, slack: int) -> list[list[int]]:
    """Indices in batches of at most `size` whose lengths differ by at most `slack`, shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < size and lengths[i] - lengths[groups[-1][0]] <= slack:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class CT2ChatModel:
    """A model run by CTranslate2, as a `ChatModel`.

    loaded: a LoadedModel (its weights are converted once, see `converted`; its tokenizer formats the prompts).
    batch_size: conversations per generation batch; score_batch_size: sequences per scoring batch.
    length_slack: prompts in one generation batch differ by at most this many tokens (see the module docstring).
    int8: 8-bit weights (a different model from the one trained; never the default).
    scoring: "torch" (multi-turn replies and all scoring on the PyTorch path) or "ctranslate2" (everything in
        CTranslate2); see the module docstring.
    threads: CPU threads of the engine (default: torch's setting, so `--threads` applies to both backends).
    """

    def __init__(self, loaded, *, batch_size: int = 32, score_batch_size: int = 32, length_slack: int = 64,
                 int8: bool = False, scoring: str = "torch", threads: int | None = None, device: str = "cpu"):
        import ctranslate2

        from dpolab.models.generate import HFChatModel

        if scoring not in ("torch", "ctranslate2"):
            raise ValueError(f"scoring must be 'torch' or 'ctranslate2', not {scoring!r}")
        self.format = ChatFormat(loaded.tokenizer)
        self.name = loaded.name + (" [int8]" if int8 else "")
        self.compute_type = "int8" if int8 else "float32"
        self.backend = f"ctranslate2 {self.compute_type}" + (" + torch scoring" if scoring == "torch" else "")
        # int8 replies are scored by the float32 PyTorch weights: the log-probs stay those of the trained model
        self.torch = HFChatModel(loaded, batch_size=batch_size, score_batch_size=score_batch_size) \
            if scoring == "torch" else None
        self.batch_size = batch_size
        self.score_batch_size = score_batch_size
        self.length_slack = length_slack
        self.path = converted(loaded.model, loaded.tokenizer)
        self._engine = dict(device=device, compute_type=self.compute_type,
                            intra_threads=threads or torch.get_num_threads())
        self.generator = ctranslate2.Generator(str(self.path), **self._engine)
        self._tokens = loaded.tokenizer.convert_ids_to_tokens

    def _fresh_generator(self, seed: int):
        """A generator whose worker thread's random stream starts at `seed` (see the module docstring)."""
        import ctranslate2

        ctranslate2.set_random_seed(seed)
        return ctranslate2.Generator(str(self.path), **self._engine)

    def token_count(self, text: str) -> int:
        return self.format.token_count(text)

    def clear_cache(self) -> None:
        """Forget the PyTorch path's cached prefixes (the engine itself keeps no state between calls)."""
        if self.torch is not None:
            self.torch.clear_cache()

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, seed: int | None = None) -> list[Generation]:
        kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed)
        if self.torch is None:
            return self._generate(conversations, **kw)
        later = [i for i, c in enumerate(conversations) if any(m["role"] == "assistant" for m in c)]
        if not later:
            return self._generate(conversations, **kw)
        first = [i for i in range(len(conversations)) if i not in set(later)]
        out: list[Generation | None] = [None] * len(conversations)
        for idx, engine in ((first, self._generate), (later, self.torch.generate)):
            for i, g in zip(idx, engine([conversations[i] for i in idx], **kw) if idx else []):
                out[i] = g
        return out  # type: ignore[return-value]

    def _generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int, do_sample: bool = False,
                  temperature: float = 1.0, seed: int | None = None) -> list[Generation]:
        """Replies generated by CTranslate2."""
        if not conversations:
            return []
        prompts = [self.format.prompt_ids(c) for c in conversations]
        generator = self._fresh_generator(0 if seed is None else seed) if do_sample else self.generator
        sampling = ({"sampling_topk": 0, "sampling_topp": 1.0, "sampling_temperature": temperature} if do_sample
                    else {"sampling_topk": 1})
        out: list[Generation | None] = [None] * len(prompts)
        for group in length_groups([len(p) for p in prompts], self.batch_size, self.length_slack):
            results = generator.generate_batch(
                [self._tokens(prompts[i]) for i in group], max_length=max_new_tokens, end_token=self.format.stop_ids,
                return_end_token=True, include_prompt_in_result=False, **sampling)
            for i, r in zip(group, results):
                out[i] = self.format.reply(r.sequences_ids[0], max_new_tokens)
        return out  # type: ignore[return-value]

    def _token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """log p of each token of each row given the ones before it (len(row) - 1 values per row)."""
        out: list[np.ndarray | None] = [None] * len(rows)
        for group in length_groups([len(r) for r in rows], self.score_batch_size, slack=1 << 30):
            results = self.generator.score_batch([self._tokens(rows[i]) for i in group], max_input_length=0)
            for i, r in zip(group, results):
                out[i] = np.asarray(r.log_probs, dtype=np.float64)
        return out  # type: ignore[return-value]

    def score_continuations(self, conversations: Sequence[Conversation],
                            continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        if self.torch is not None:
            return self.torch.score_continuations(conversations, continuations)
        rows, spans = self.format.continuation_rows(conversations, continuations)
        logps = self._token_logprobs(rows)
        return regroup([float(lp[len(lp) - n:].sum()) if n else 0.0 for lp, n in zip(logps, spans)], continuations)

    def next_token_logprobs(self, conversations: Sequence[Conversation], candidates: Sequence[str], *,
                            prefix: str = "") -> list[list[float]]:
        if self.torch is not None:
            return self.torch.next_token_logprobs(conversations, candidates, prefix=prefix)
        cand = self.format.candidate_ids(candidates)
        prompts = [self.format.prompt_ids(c, prefix=prefix) for c in conversations]
        out: list[list[float] | None] = [None] * len(prompts)
        for group in length_groups([len(p) for p in prompts], self.score_batch_size, self.length_slack):
            results = self.generator.generate_batch(
                [self._tokens(prompts[i]) for i in group], max_length=1, sampling_topk=1, return_logits_vocab=True,
                include_prompt_in_result=False)
            for i, r in zip(group, results):
                logits = torch.from_numpy(np.asarray(r.logits[0][-1], dtype=np.float64)).reshape(-1)  # (V,)
                logps = logits.log_softmax(-1)
                out[i] = [float(logps[c]) for c in cand]
        return out  # type: ignore[return-value]

    def score_texts(self, texts: Sequence[str]) -> list[TextScore]:
        if self.torch is not None:
            return self.torch.score_texts(texts)
        rows = [self.format.ids(t) for t in texts]
        scorable = [i for i, r in enumerate(rows) if len(r) > 1]
        out = [TextScore(0.0, 0)] * len(rows)
        for i, lp in zip(scorable, self._token_logprobs([rows[i] for i in scorable])):
            out[i] = TextScore(float(lp.sum()), len(lp))
        return out


class _Backend:
    """The `ctranslate2` entry of dpolab.models.backends.BACKENDS."""

    name = "ctranslate2"

    def unavailable(self, loaded, *, int8: bool) -> str | None:
        if not installed():
            return "ctranslate2 is not installed (pip install ctranslate2)"
        model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        kind = type(model.config).__name__
        try:  # the converter's table of supported configurations (not a public name; without it, conversion says)
            from ctranslate2.converters.transformers import _MODEL_LOADERS
        except ImportError:
            _MODEL_LOADERS = None
        if _MODEL_LOADERS is not None and kind not in _MODEL_LOADERS:
            return f"CTranslate2 has no converter for {kind}"
        dtype = next(model.parameters()).dtype
        if dtype is not torch.float32:
            return f"the model is {str(dtype).removeprefix('torch.')} and the backend runs float32 weights"
        if next(model.parameters()).device.type != "cpu":
            return "the model is on a GPU; this backend runs it on the CPU"
        return None

    def wrap(self, loaded, *, batch_size: int, int8: bool = False) -> CT2ChatModel:
        return CT2ChatModel(loaded, batch_size=batch_size, int8=int8)


BACKEND = _Backend()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
