"""What a model computes on replies it is shown: each layer's residual state and MLP neuron activations, read by
hooks on teacher-forced conversations and averaged over the reply's tokens, the first reply token excluded.

The first token is left out because a small model's first positions carry "massive activations" (a few residual
dimensions hundreds of times larger than the rest, Sun et al. 2024, arXiv:2402.17762): pooled over all tokens, the
largest direction in the data is that dimension, not the behaviour (a DeTox prototype on SmolLM2 projected it out
and doubled the perplexity). `massive_dims` finds any such dimension left after the cut, so callers can drop it too.

Works on Llama-shaped decoders (`model.model.layers[i].mlp.down_proj`), which is every model dpolab trains.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dpolab.errors import ModelError
from dpolab.models.chat import ChatFormat


@dataclass(frozen=True)
class Sample:
    """A reply to read activations on, with the behaviour's reading of it.

    item_id: the probe item it answers (the unit CIs resample).
    conversation: the messages before the reply.
    outcome: the probe's per-reply reading: a score (toxicity) or 0/1 (1 = held/yielded, as the behaviour defines).
    """

    item_id: str
    conversation: tuple[dict[str, str], ...]
    reply: str
    outcome: float
    source: str = ""  # which model wrote the reply ("base", "tuned")


@dataclass
class ReplyActivations:
    """Per-sample means over pooled reply tokens, in float64.

    residual: (n, L, d) each decoder layer's output (the residual stream after layer l).
    neurons: (n, L, N) each MLP neuron's activation, the input of down_proj (act(gate(x)) * up(x)).
    mlp_out: (n, L, d) each layer's MLP output (down_proj's output).
    tokens: (n,) how many reply tokens each mean is over; 0 where the reply had one token or none.
    """

    residual: torch.Tensor
    neurons: torch.Tensor | None
    mlp_out: torch.Tensor | None
    tokens: torch.Tensor
    samples: list[Sample] = field(default_factory=list)

    def kept(self) -> torch.Tensor:
        """Indices of samples with at least one pooled token."""
        return torch.nonzero(self.tokens > 0).flatten()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a Llama-shaped causal LM (also under a PEFT wrapper)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's causal LM
    layers = getattr(getattr(core, "model", None), "layers", None)
    if layers is None or not all(hasattr(getattr(l, "mlp", None), "down_proj") for l in layers):
        raise ModelError(f"{type(model).__name__} is not a Llama-shaped decoder (model.layers[i].mlp.down_proj); "
                         "mechanism analysis and weight edits need one")
    return list(layers)


def down_projections(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Each layer's MLP output projection: its weight's column i is neuron i's value vector, (d, N)."""
    return [layer.mlp.down_proj for layer in decoder_layers(model)]


def encode(fmt: ChatFormat, sample: Sample) -> tuple[list[int], int]:
    """The ids of the conversation with the reply, and where the reply starts."""
    prompt = fmt.prompt_ids(list(sample.conversation))
    return prompt + fmt.ids(sample.reply), len(prompt)


@contextmanager
def _hooks(model: torch.nn.Module, store: dict[str, list[torch.Tensor]], *, neurons: bool, mlp_out: bool):
    """Record each layer's output, and (if asked) its down_proj input and output, for one forward."""
    handles = []

    def keep(key: str, l: int):
        def hook(module, args, output):
            store[key][l] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    def keep_input(l: int):
        def hook(module, args, output):
            store["neurons"][l] = args[0].detach()
            if mlp_out:
                store["mlp_out"][l] = output.detach()
        return hook

    try:
        for l, layer in enumerate(decoder_layers(model)):
            handles.append(layer.register_forward_hook(keep("residual", l)))
            if neurons or mlp_out:
                handles.append(layer.mlp.down_proj.register_forward_hook(keep_input(l)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def reply_activations(model: torch.nn.Module, tokenizer, samples: Sequence[Sample], *, neurons: bool = True,
                      mlp_out: bool = False, batch_size: int = 8, skip_first: int = 1) -> ReplyActivations:
    """Each sample's mean residual state (and neuron activations) over its reply tokens, layer by layer.

    skip_first: reply tokens left out at the start (see the module docstring); 0 keeps them all.
    """
    fmt = ChatFormat(tokenizer)
    layers = decoder_layers(model)
    n_layers = len(layers)
    device = next(model.parameters()).device
    encoded = [encode(fmt, s) for s in samples]
    res_out: list[torch.Tensor] = []
    neu_out: list[torch.Tensor] = []
    mlp_outs: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(samples), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), fmt.pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            pool = torch.zeros((len(chunk), width), dtype=torch.float64)  # (B, T) 1 on pooled reply tokens
            for b, (row, reply_start) in enumerate(chunk):  # right padding: positions match an unpadded forward
                ids[b, :len(row)] = torch.tensor(row)
                attention[b, :len(row)] = 1
                pool[b, reply_start + skip_first:len(row)] = 1.0
            count = pool.sum(1)  # (B,)
            weights = pool / count.clamp(min=1)[:, None]  # (B, T) mean over pooled tokens
            store: dict[str, list] = {"residual": [None] * n_layers, "neurons": [None] * n_layers,
                                      "mlp_out": [None] * n_layers}
            with _hooks(model, store, neurons=neurons, mlp_out=mlp_out):
                model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)

            def pooled(key: str) -> torch.Tensor:
                stacked = torch.stack([t.to(torch.float64).cpu() for t in store[key]], dim=1)  # (B, L, T, k)
                return torch.einsum("blth,bt->blh", stacked, weights)  # (B, L, k)

            res_out.append(pooled("residual"))
            if neurons:
                neu_out.append(pooled("neurons"))
            if mlp_out:
                mlp_outs.append(pooled("mlp_out"))
            counts.append(count)
    finally:
        model.train(was_training)
    cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
    return ReplyActivations(residual=torch.cat(res_out), neurons=cat(neu_out), mlp_out=cat(mlp_outs),
                            tokens=torch.cat(counts), samples=list(samples))


def massive_dims(residual: torch.Tensor, *, ratio: float = 100.0) -> torch.Tensor:
    """(L, d) bool: dimensions whose mean |value| in a layer is above `ratio` times that layer's median dimension.

    residual: (n, L, d) pooled states. The median dimension is the yardstick because a massive dimension is one
    of a handful; `ratio` 100 is far above the spread of ordinary dimensions (a few times the median) and far below
    a massive one (10^3 and more in the papers that describe them).
    """
    size = residual.abs().mean(0)  # (L, d)
    return size > ratio * size.median(dim=1, keepdim=True).values
