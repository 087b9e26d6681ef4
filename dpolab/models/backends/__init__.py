"""Inference backends: which engine runs a model's generation and scoring behind the `ChatModel` protocol.

`hf` runs the PyTorch model itself (dpolab's batching and prefix cache, `dpolab.models.generate`); `ctranslate2`
converts the weights once and runs single-turn generation in CTranslate2's C++ engine; `vllm` runs the model in
vLLM on a GPU. All of them format prompts with the same `ChatFormat`, so the probes and contexts never know which
one runs.

`auto` is `vllm` when the model is on a GPU and vLLM is installed, otherwise `hf`. CTranslate2 is not the CPU
default because it measured no faster than `hf` on dpolab's evaluation: the full default eval of SmolLM2-135M
took 374 s on `hf` and 379 s on `ctranslate2` (AMD EPYC, 2 threads, `dpolab bench eval`). The eval is
compute-bound and the `hf` path already shares prompt passes between a dialogue's turns and a question's
candidates, which CTranslate2 cannot (see dpolab.models.backends.ctranslate2).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dpolab.errors import ConfigError
from dpolab.registry import Registry

BACKENDS = Registry("inference backend", {
    "hf": "dpolab.models.generate:BACKEND",
    "ctranslate2": "dpolab.models.backends.ctranslate2:BACKEND",
    "vllm": "dpolab.models.backends.vllm:BACKEND",
})
BACKEND_CHOICES = ("auto", *BACKENDS.names())


class Backend(Protocol):
    """What a backend module offers: why it cannot run a model (None when it can), and the model wrapped."""

    name: str

    def unavailable(self, loaded, *, int8: bool) -> str | None: ...

    def wrap(self, loaded, *, batch_size: int, int8: bool): ...


@dataclass(frozen=True)
class Choice:
    """The backend that will run, and why `auto` chose it (empty when it was asked for by name)."""

    name: str
    reason: str = ""


def choose(backend: str, loaded, *, int8: bool = False) -> Choice:
    """Resolve `auto` (see the module docstring) and check a named backend can run this model; a named one that
    can't is an error. `reason` is set when `auto` passed over a backend it would have used."""
    if backend not in BACKEND_CHOICES:
        BACKENDS.check(backend)  # raises with the choices and a close match
    if int8 and backend == "hf":
        raise ConfigError("int8 weights need --backend ctranslate2 (or auto); the hf backend runs the weights as loaded")
    if backend != "auto":
        why = BACKENDS.get(backend).unavailable(loaded, int8=int8)
        if why:
            raise ConfigError(f"backend {backend!r} cannot run {loaded.name!r}: {why}")
        return Choice(backend)
    if int8:  # 8-bit weights exist on one backend only
        why = BACKENDS.get("ctranslate2").unavailable(loaded, int8=int8)
        if why:
            raise ConfigError(f"int8 weights need the ctranslate2 backend, which cannot run here: {why}")
        return Choice("ctranslate2")
    if _on_gpu(loaded):
        why = BACKENDS.get("vllm").unavailable(loaded, int8=False)
        return Choice("hf", why) if why else Choice("vllm")
    return Choice("hf")


def chat_model(loaded, *, backend: str = "auto", batch_size: int = 32, int8: bool = False,
               echo: Callable[[str], None] | None = None):
    """`loaded` (a LoadedModel) as a ChatModel on the chosen backend.

    backend: auto, hf, ctranslate2 or vllm (BACKEND_CHOICES).
    int8: CTranslate2 with 8-bit weights: faster, but a different model from the one trained, so never the
        default; the model's name and the eval summary say so.
    echo: where the one line on an automatic fallback to `hf` goes (default: stderr).
    """
    choice = choose(backend, loaded, int8=int8)
    if choice.reason:
        (echo or _stderr)(f"dpolab: backend hf ({choice.reason})")
    return BACKENDS.get(choice.name).wrap(loaded, batch_size=batch_size, int8=int8)


def _on_gpu(loaded) -> bool:
    try:
        return next(loaded.model.parameters()).device.type != "cpu"
    except (StopIteration, AttributeError):
        return False


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
