"""The `vllm` inference backend: the model run by vLLM's offline `LLM` engine on a GPU, behind `ChatModel`.

vLLM loads models from a folder, so a model in memory (a trained cell) is first saved as a Hugging Face folder
under $DPOLAB_HOME/hf-export, keyed by its weights like the CTranslate2 conversions. Prompts go in as token ids
formatted by the shared `ChatFormat`, so the same conversation is the same tokens as on the other backends.
- `generate`: greedy is temperature 0; a seeded sampling call gives request i the seed `seed + i`, so the same
  inputs and seed give the same samples and repeated prompts still draw independent ones.
- Scoring reads `prompt_logprobs` (the log-prob of every prompt token given the ones before it); with prefix
  caching on, the candidates of one conversation share its prompt's keys and values.
- `next_token_logprobs` scores prompt + candidate for each candidate (exact; no top-k truncation).

Needs `pip install vllm` and a CUDA GPU; on this project's CPU machines it is never chosen, and its tests skip.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

from dpolab.io import atomic_dir, atomic_write_json
from dpolab.models.chat import ChatFormat, Conversation, Generation, regroup
from dpolab.models.load import dpolab_home, weights_fingerprint
from dpolab.models.scoring import TextScore

MARKER = "dpolab-export.json"


def installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def exported(loaded) -> Path:
    """A Hugging Face folder holding exactly these weights (LoRA adapters merged), saved once per set of weights."""
    import copy

    key = weights_fingerprint(loaded.model)[:32]
    root = dpolab_home() / "hf-export"
    final = root / key
    if (final / MARKER).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{key}.lock")):
        if not (final / MARKER).exists():
            model = loaded.model
            if hasattr(model, "merge_and_unload"):
                model = copy.deepcopy(model).merge_and_unload()
            with atomic_dir(final) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                loaded.tokenizer.save_pretrained(tmp)
                atomic_write_json(tmp / MARKER, {"weights": key})
    return final


class VLLMChatModel:
    """A model run by vLLM, as a `ChatModel`. `engine_args` go to `vllm.LLM` (e.g. gpu_memory_utilization)."""

    def __init__(self, loaded, *, batch_size: int = 32, dtype: str = "float32", **engine_args):
        from vllm import LLM

        self.format = ChatFormat(loaded.tokenizer)
        self.name = loaded.name
        self.backend = f"vllm {dtype}"
        self.batch_size = batch_size  # vLLM schedules its own batches; kept for the protocol's callers
        self.llm = LLM(model=str(exported(loaded)), dtype=dtype, trust_remote_code=False, enable_prefix_caching=True,
                       **engine_args)

    def token_count(self, text: str) -> int:
        return self.format.token_count(text)

    def clear_cache(self) -> None:
        """vLLM manages its own prefix cache."""

    def _run(self, rows: Sequence[Sequence[int]], params):
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r)) for r in rows]
        return self.llm.generate(prompts, params if isinstance(params, list) else [params] * len(prompts),
                                 use_tqdm=False)

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, seed: int | None = None) -> list[Generation]:
        from vllm import SamplingParams

        prompts = [self.format.prompt_ids(c) for c in conversations]
        common = dict(max_tokens=max_new_tokens, stop_token_ids=self.format.stop_ids, skip_special_tokens=False)
        if do_sample:
            base = 0 if seed is None else seed
            params = [SamplingParams(temperature=temperature, top_k=-1, top_p=1.0, seed=base + i, **common)
                      for i in range(len(prompts))]
        else:
            params = SamplingParams(temperature=0.0, **common)
        return [self.format.reply(list(r.outputs[0].token_ids), max_new_tokens) for r in self._run(prompts, params)]

    def _prompt_logprobs(self, rows: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p of each token after the first, given the ones before it."""
        from vllm import SamplingParams

        out = []
        for row, res in zip(rows, self._run(rows, SamplingParams(max_tokens=1, prompt_logprobs=0))):
            per = res.prompt_logprobs or []
            out.append([float(per[t][row[t]].logprob) for t in range(1, len(row))])
        return out

    def score_continuations(self, conversations: Sequence[Conversation],
                            continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        rows, spans = self.format.continuation_rows(conversations, continuations)
        logps = self._prompt_logprobs(rows)
        return regroup([sum(lp[len(lp) - n:]) if n else 0.0 for lp, n in zip(logps, spans)], continuations)

    def next_token_logprobs(self, conversations: Sequence[Conversation], candidates: Sequence[str], *,
                            prefix: str = "") -> list[list[float]]:
        cand = self.format.candidate_ids(candidates)
        prompts = [self.format.prompt_ids(c, prefix=prefix) for c in conversations]
        rows = [p + [c] for p in prompts for c in cand]
        last = [lp[-1] for lp in self._prompt_logprobs(rows)]
        return [last[i * len(cand):(i + 1) * len(cand)] for i in range(len(prompts))]

    def score_texts(self, texts: Sequence[str]) -> list[TextScore]:
        rows = [self.format.ids(t) for t in texts]
        scorable = [i for i, r in enumerate(rows) if len(r) > 1]
        out = [TextScore(0.0, 0)] * len(rows)
        for i, lp in zip(scorable, self._prompt_logprobs([rows[i] for i in scorable])):
            out[i] = TextScore(float(sum(lp)), len(lp))
        return out


class _Backend:
    """The `vllm` entry of dpolab.models.backends.BACKENDS."""

    name = "vllm"

    def unavailable(self, loaded, *, int8: bool) -> str | None:
        if int8:
            return "int8 weights are a CTranslate2 option"
        if not installed():
            return "vllm is not installed (pip install vllm; it needs a CUDA GPU)"
        import torch

        if not torch.cuda.is_available():
            return "vLLM runs on a CUDA GPU and torch sees none"
        return None

    def wrap(self, loaded, *, batch_size: int, int8: bool = False) -> VLLMChatModel:
        return VLLMChatModel(loaded, batch_size=batch_size)


BACKEND = _Backend()
