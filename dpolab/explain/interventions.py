"""Interventions on MLP neurons while a model runs: ablation (a neuron's activation set to zero) and patching (a
neuron writes what the tuned model's neuron writes), by hooks on each layer's down_proj.

Patching neuron i replaces its write m_i v_i with m*_i v*_i: the tuned model's value vector v*_i and an activation
m*_i that is either the tuned model's activation at the same position (a tensor as long as the sequence, for an
exact check) or its mean over replies (a constant, for generation: "write the tuned model's mean activations into
the base model", Lee et al. 2024 §5 and Yang et al. 2024 §4). Patching every neuron at every position with the
tuned model's own activations gives the tuned model's MLP outputs exactly.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dpolab.explain.activations import down_projections


@dataclass(frozen=True)
class Patch:
    """What one layer's patched neurons write.

    neurons: (k,) indices into the layer's N neurons.
    activations: (k,) a constant per neuron, or (B, T, k) per position of the running batch.
    values: (d, k) the tuned model's value vectors of those neurons.
    """

    neurons: torch.Tensor
    activations: torch.Tensor
    values: torch.Tensor


@contextmanager
def ablate(model: torch.nn.Module, neurons: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Zero the activations of the given neurons ({layer: (k,) indices}) while the block runs."""
    handles = []
    projections = down_projections(model)

    def hook_for(idx: torch.Tensor):
        def hook(module, args):
            x = args[0].clone()
            x[..., idx] = 0.0
            return (x,)
        return hook

    try:
        for layer, idx in neurons.items():
            if len(idx):
                handles.append(projections[layer].register_forward_pre_hook(hook_for(torch.as_tensor(idx, dtype=torch.long))))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def patch(model: torch.nn.Module, patches: Mapping[int, Patch]) -> Iterator[None]:
    """Replace the writes of the given neurons ({layer: Patch}) while the block runs (see the module docstring)."""
    handles = []
    projections = down_projections(model)

    def hook_for(proj: torch.nn.Linear, p: Patch):
        idx = torch.as_tensor(p.neurons, dtype=torch.long)
        own = proj.weight[:, idx].detach()  # (d, k) the running model's value vectors of the patched neurons

        def hook(module, args, output):
            m = args[0][..., idx]  # (B, T, k)
            new = p.activations.to(m.dtype)
            if new.dim() == 1:
                new = new.expand_as(m)
            # (B, T, d): take out what the neurons wrote, put in what the tuned ones write
            return output - m @ own.T.to(m.dtype) + new @ p.values.T.to(m.dtype)
        return hook

    try:
        for layer, p in patches.items():
            if len(p.neurons):
                handles.append(projections[layer].register_forward_hook(hook_for(projections[layer], p)))
        yield
    finally:
        for h in handles:
            h.remove()


def by_layer(flat: torch.Tensor | list[int], n_per_layer: int) -> dict[int, torch.Tensor]:
    """Flat neuron indices (layer * N + i) -> {layer: indices}."""
    flat = torch.as_tensor(flat, dtype=torch.long)
    out: dict[int, torch.Tensor] = {}
    for layer in torch.unique(flat // n_per_layer).tolist():
        out[int(layer)] = flat[flat // n_per_layer == layer] % n_per_layer
    return out
