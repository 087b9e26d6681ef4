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
