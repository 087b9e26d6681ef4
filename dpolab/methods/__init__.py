"""Method kinds beyond one offline training run: how a cell turns its context into a tuned model.

`train` (a loss on the context's pairs) and `edit` (dpolab.edits) are the runner's own; every other kind is one
module here with a `KIND` (a `MethodKind`): typed options, read from the method's `options:` in a spec and
validated at load like a probe's, and a `run` that takes a `CellJob` and returns a `Tuned` model. Adding a kind
is one file and one line in METHOD_KINDS.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpolab.registry import Registry

if TYPE_CHECKING:
    import torch

    from dpolab.config import TrainConfig
    from dpolab.models.chat import ChatModel

BUILTIN_KINDS = ("train", "edit")  # run by dpolab.experiment.runner itself
METHOD_KINDS = Registry("method kind", {
    "curriculum": "dpolab.methods.curriculum:KIND",  # Curry-DPO (Pattnaik et al. 2024)
    "iterative": "dpolab.methods.iterative:KIND",  # iterative online DPO; iLR-DPO with the rdpo loss (Liu et al. 2024)
    "rl": "dpolab.methods.rl:KIND",  # critic-free RL: Lite PPO, GRPO, RLOO
})


def kind_names() -> list[str]:
    return [*BUILTIN_KINDS, *METHOD_KINDS.names()]


@dataclass(frozen=True)
class Prompt:
    """One of the context's prompts: the messages before the reply, named by the first pair that holds them."""

    id: str
    messages: list[dict[str, str]]


def context_prompts(data: str | Path) -> list[Prompt]:
    """The distinct prompts of a context's pairs file, in file order: what a kind that samples online samples on."""
    import json

    from dpolab.data.read import read_pairs

    seen: dict[str, Prompt] = {}
    for pair in read_pairs(data).pairs:
        seen.setdefault(json.dumps(pair.prompt, sort_keys=True),
                        Prompt(id=pair.id, messages=[dict(m) for m in pair.prompt]))
    return list(seen.values())


@dataclass
class CellJob:
    """What a method kind gets to tune one cell.

    config: the cell's TrainConfig (the spec's shared, context and method train keys; the runner's data, out and
        seed), for kinds that train: its `data` is the context's pairs file, its `out` the cell's train folder.
    options: the kind's own options (an instance of its MethodKind.options).
    base: the base model as a ChatModel (for sampling), shared with the runner; do not hook or train it.
    model_name: the spec's model (load a fresh copy with dpolab.models.load.load_model to train it).
    context, source: the cell's context name and the real context it derives from (they differ for placebos).
    context_options: the context's options as the runner built its pairs with (stance reader included).
    work: a folder of the cell's own for the kind's intermediate files (rounds, stages), kept for --resume.
    say: one line to the run's log.
    """

    config: TrainConfig
    options: Any
    base: ChatModel
    model_name: str
    context: str
    source: str
    context_options: dict[str, Any]
    seed: int
    work: Path
    say: Callable[[str], None] = print

    def context_default(self, key: str, fallback: Any) -> Any:
        """The context's own value of a sampling option (as the spec set it, else its declared default), else
        `fallback` (a context without that option, or a user's data)."""
        return context_value(self.source, self.context_options, key, fallback)


def context_value(source: str, context_options: dict[str, Any], key: str, fallback: Any) -> Any:
    """A context's option `key` as the spec set it (context_options), else the context's declared default, else
    `fallback`."""
    import dataclasses

    if context_options.get(key) is not None:
        return context_options[key]
    from dpolab.contexts import CONTEXTS

    if source in CONTEXTS:
        for f in dataclasses.fields(CONTEXTS.get(source).options):
            if f.name == key and f.default is not dataclasses.MISSING and f.default is not None:
                return f.default
    return fallback


@dataclass
class Tuned:
    """A kind's result: the tuned model (in memory, eval mode), the optimizer steps it took, and what cell.json
    should record about the run (per-stage or per-round numbers)."""

    model: torch.nn.Module
    steps: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodKind:
    """A registered method kind: its name, its options dataclass (frozen, keyword-only; defaults are the CPU
    defaults) and its run function."""

    name: str
    options: type
    run: Callable[[CellJob], Tuned]
    summary: str = ""

    def make_options(self, overrides: dict[str, Any] | None = None):
        from dpolab.options import make_options

        return make_options(self.options, overrides, kind="method kind", name=self.name)
