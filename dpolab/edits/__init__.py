"""Weight edits: methods that change a model from preference pairs by projection instead of training (ProFS and
its random-subspace control), the registry of their names, the layer spec they read, and the report they write.

An edit kind is a function that chooses, for one layer, the directions to remove from that layer's MLP output
(`dpolab.edits.profs.Chooser`); `dpolab.edits.profs.apply_edit` reads the embeddings, calls it per layer and
projects the weights. This module imports no torch, so the spec validator can check names and layers cheaply.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dpolab.errors import ConfigError
from dpolab.registry import Registry

EDITS = Registry("edit", {
    "profs": "dpolab.edits.profs:profs_directions",  # Uppaal et al. 2024 (arXiv:2405.13967)
    "random-subspace": "dpolab.edits.profs:random_directions",  # the same edit along random directions: a control
})

DEFAULT_K = 10  # the prototype's choice on SmolLM2 (toxicity -0.030 [-0.057, -0.003]; random 0.000)

LayerSpec = list[int] | str | None  # [15, 16], "15-29", "3,5,10-12"; None: the upper half of the model's layers


def parse_layers(spec: LayerSpec, n_layers: int | None = None) -> list[int] | None:
    """The layer indices a spec names, sorted and without repeats.

    spec: a list of ints, a string of comma-separated ints and inclusive ranges ("15-29"), or None for the upper
    half of the model's layers (range(n_layers // 2, n_layers)).
    n_layers: the model's decoder layers; None checks only the syntax (returns None for a None spec).
    """
    if spec is None:
        return None if n_layers is None else list(range(n_layers // 2, n_layers))
    out: list[int] = []
    if isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",")):
            lo, dash, hi = part.partition("-")
            try:
                first, last = int(lo), int(hi) if dash else int(lo)
            except ValueError:
                raise ConfigError(f"layers {spec!r}: {part!r} is not a layer or a range like '15-29'") from None
            if last < first:
                raise ConfigError(f"layers {spec!r}: the range {part!r} runs backwards")
            out += range(first, last + 1)
    elif isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        out = list(spec)
    else:
        raise ConfigError(f"layers must be a list of ints or a string like '15-29', not {spec!r}")
    if not out:
        raise ConfigError("layers names no layer; leave it out for the upper half of the model")
    bad = [i for i in out if i < 0 or (n_layers is not None and i >= n_layers)]
    if bad:
        valid = f"0-{n_layers - 1}" if n_layers is not None else "non-negative"
        raise ConfigError(f"layers {bad} are out of range; the model's layers are {valid}")
    return sorted(set(out))


@dataclass(frozen=True)
class LayerEdit:
    """What an edit did to one layer.

    rank: directions removed (k, or fewer when the centred differences have lower rank or too few allowed dims).
    massive_dims: residual dimensions left out of the embeddings and the directions (massive activations).
    singular_values: the largest singular values of the layer's centred differences (up to 32), for both kinds.
    explained: share of the centred differences' squared norm inside the removed directions (ProFS: the top-k
    share; random: what random directions happen to catch, about rank / allowed dims).
    weight_change: ||W - W'||_F / ||W||_F of the layer's down_proj weight.
    """

    layer: int
    rank: int
    massive_dims: list[int]
    singular_values: list[float]
    explained: float
    weight_change: float


@dataclass
class EditReport:
    """An edit's record, written as OUT/edit/edit.json by the runner.

    pairs_dropped: reason -> pairs left out of the embeddings (kept out of the SVD, never silently).
    nll_before / nll_after: mean NLL per token (nats) on held-out text chunks, before and after the edit.
    """

    kind: str
    k: int
    layers: list[int]
    seed: int
    pairs_total: int
    pairs_used: int
    pairs_dropped: dict[str, int] = field(default_factory=dict)
    dropped_ids: list[str] = field(default_factory=list)
    per_layer: list[LayerEdit] = field(default_factory=list)
    nll_before: float | None = None
    nll_after: float | None = None
    heldout_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The short form kept in cell.json."""
        ppl = lambda nll: None if nll is None else math.exp(nll)  # noqa: E731
        return {"kind": self.kind, "k": self.k, "layers": self.layers, "pairs_used": self.pairs_used,
                "pairs_dropped": self.pairs_dropped, "directions_removed": sum(e.rank for e in self.per_layer),
                "nll_before": self.nll_before, "nll_after": self.nll_after,
                "perplexity_before": ppl(self.nll_before), "perplexity_after": ppl(self.nll_after)}
