"""The forward pass: a batch of preference pairs -> summed completion log-probs, the prompt run once per pair.

This is the one function the trainer, the reference cache and the benchmarks call to turn pairs into
sequence log-probs. Two ways are implemented, and give the same numbers:

* ``prefix`` (default): the prompt runs once; its key/value cache is repeated for the chosen and the
  rejected completion, which then attend to it. Gradients flow back through the cache into the prompt
  pass. Only completion positions reach the LM head, in chunks, so full-vocabulary logits are never
  materialised for the prompt and never for more than ``chunk_tokens`` positions at a time.
* ``concat``: prompt + completion run as one sequence, once for chosen and once for rejected, the LM head
  still only on completion positions. The fallback for architectures whose cache can't be reused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FORWARD_MODES = ("prefix", "concat")


@dataclass
class PairBatch:
    """Tokenized pairs, padded. Masks come from lengths: SmolLM2's pad id is also its end-of-turn id."""

    ids: list[str]
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_lens: torch.Tensor  # (B,)
    completion_ids: torch.Tensor  # (2B, C) right-padded, interleaved: chosen_0, rejected_0, chosen_1, ...
    completion_lens: torch.Tensor  # (2B,)
    weights: torch.Tensor  # (B,)
    score_chosen: torch.Tensor | None = None  # (B,)
    score_rejected: torch.Tensor | None = None  # (B,)
    index: torch.Tensor | None = None  # (B,) positions of the pairs in their dataset, for the reference cache

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        """Unique tokens the batch carries: each prompt once, both completions."""
        return int(self.prompt_lens.sum() + self.completion_lens.sum())

    def to(self, device) -> "PairBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PairBatch(**moved)


def collate_pairs(pairs, *, pad_id: int, index: list[int] | None = None) -> PairBatch:
    """Pad TokenizedPairs (dpolab.data) into a PairBatch."""
    B = len(pairs)
    P = max(len(p.prompt_ids) for p in pairs)
    completions = [c for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    C = max(len(c) for c in completions)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    for i, p in enumerate(pairs):
        prompt_ids[i, P - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
    completion_ids = torch.full((2 * B, C), pad_id, dtype=torch.long)
    for i, c in enumerate(completions):
        completion_ids[i, : len(c)] = torch.tensor(c)

    def scores(attr):
        values = [getattr(p, attr) for p in pairs]
        return None if any(v is None for v in values) else torch.tensor(values, dtype=torch.float32)

    return PairBatch(
        ids=[p.id for p in pairs],
        prompt_ids=prompt_ids,
        prompt_lens=torch.tensor([len(p.prompt_ids) for p in pairs]),
        completion_ids=completion_ids,
        completion_lens=torch.tensor([len(c) for c in completions]),
        weights=torch.tensor([p.weight for p in pairs], dtype=torch.float32),
        score_chosen=scores("score_chosen"),
        score_rejected=scores("score_rejected"),
        index=None if index is None else torch.tensor(index),
    )


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[y] for N positions, computed `chunk` rows at a time in forward and backward.

    Only (chunk, V) logits exist at any moment; backward recomputes them instead of storing them.
    d/dh = g (W_y - p W),  d/dW = (onehot_y - p)^T (g h),  d/db = sum (onehot_y - p) g,  p = softmax(h W^T + b).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # hidden (N, H), weight (V, H), targets (N,)
        out = hidden.new_empty(hidden.shape[0], dtype=_up(hidden[:0]).dtype)
        for s in range(0, hidden.shape[0], chunk):
            logits = _up(F.linear(hidden[s : s + chunk], weight, bias))  # (n, V)
            out[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        hidden, weight, bias, targets = ctx.saved_tensors
        chunk = ctx.chunk
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = _up(weight[:0]).dtype  # accumulate weight gradients in at least fp32
        grad_w = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]  # (n, H)
            y = targets[s : s + chunk]  # (n,)
            g = grad_out[s : s + chunk].to(acc)  # (n,)
            # dlogp/dlogits = onehot(y) - softmax; scaled by the incoming gradient
            d_logits = -_up(F.linear(h, weight, bias)).softmax(-1) * g[:, None]  # (n, V)
            d_logits[torch.arange(len(y)), y] += g
            d_logits = d_logits.to(weight.dtype)
            if grad_h is not None:
                grad_h[s : s + chunk] = d_logits @ weight  # (n, H)
            if grad_w is not None:
                grad_w += d_logits.t().to(acc) @ h.to(acc)  # (V, H)
            if grad_b is not None:
                grad_b += d_logits.to(acc).sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, chunk_tokens: int = 512) -> torch.Tensor:
    """Log-probs of `targets` under the LM head at the given hidden states, never holding more than
    chunk_tokens x vocabulary logits.  hidden (N, H), targets (N,) -> (N,)"""
    if isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear:
        return _ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, chunk_tokens)
    # An adapter-wrapped or unusual head: call it per chunk with plain autograd (bounded in forward only).
    parts = []
    for s in range(0, hidden.shape[0], chunk_tokens):
        logits = _up(head(hidden[s : s + chunk_tokens]))  # (n, V)
        parts.append(logits.gather(-1, targets[s : s + chunk_tokens, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(parts) if parts else hidden.new_zeros(0)


def _causal_lm_parts(model):
    """(decoder body, LM head) of a causal LM, looking through peft wrappers, or None if it can't be split."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # logits are post-processed after the head; only the model's own forward is exact
    body = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if body is None or head is None or body is inner:
        return None
    return body, head


def _up(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast for the softmax; fp32 and fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


_warned: set[str] = set()


def _note_fallback(model, reason: str) -> None:
    name = type(model).__name__
    if name not in _warned:
        _warned.add(name)
        log.warning("%s: prefix-shared forward unavailable (%s); using the concatenated forward", name, reason)


def _gather_completion_logps(head, hidden, completion_ids, completion_lens, chunk_tokens) -> torch.Tensor:
    """hidden[i, t] predicts completion_ids[i, t]; sum the log-probs over each completion's length."""
    n, C = completion_ids.shape
    valid = torch.arange(C, device=completion_ids.device)[None, :] < completion_lens[:, None]  # (n, C)
    logps = token_logps(head, hidden[valid], completion_ids[valid], chunk_tokens=chunk_tokens)  # (N,)
    row = torch.arange(n, device=completion_ids.device)[:, None].expand(n, C)[valid]  # (N,)
    return torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, row, logps)  # (n,)


def _prefix_forward(body, head, batch: PairBatch, chunk_tokens: int) -> torch.Tensor:
    B, P = batch.prompt_ids.shape
    prompt_mask = torch.arange(P, device=batch.prompt_ids.device)[None, :] >= (P - batch.prompt_lens)[:, None]  # (B, P)
    prompt_pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
    out = body(input_ids=batch.prompt_ids, attention_mask=prompt_mask.long(), position_ids=prompt_pos, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)  # (2B, ...): chosen_i and rejected_i share prompt i
    last_prompt_hidden = out.last_hidden_state[:, -1].repeat_interleave(2, dim=0)  # (2B, H)

    C = batch.completion_ids.shape[1]
    comp_mask = torch.ones_like(batch.completion_ids)  # (2B, C); positions past a completion's end are causal-only
    mask = torch.cat([prompt_mask.long().repeat_interleave(2, dim=0), comp_mask], dim=1)  # (2B, P + C)
    pos = batch.prompt_lens.repeat_interleave(2)[:, None] + torch.arange(C, device=mask.device)[None, :]  # (2B, C)
    comp = body(input_ids=batch.completion_ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    # token t of a completion is predicted by the hidden state before it: the prompt's last for t = 0
    hidden = torch.cat([last_prompt_hidden[:, None], comp.last_hidden_state[:, :-1]], dim=1)  # (2B, C, H)
    return _gather_completion_logps(head, hidden, batch.completion_ids, batch.completion_lens, chunk_tokens)


def _concat_forward(model, parts, batch: PairBatch) -> torch.Tensor:
    """Each of chosen and rejected as prompt + completion, right-padded, one forward for all 2B rows."""
    B, P = batch.prompt_ids.shape
    rows, starts = [], []
    prompt_lens = batch.prompt_lens.tolist()
    for i in range(2 * B):
        p = batch.prompt_ids[i // 2, P - prompt_lens[i // 2]:]
        rows.append(torch.cat([p, batch.completion_ids[i, : batch.completion_lens[i]]]))
        starts.append(len(p))
    L = max(len(r) for r in rows)
    ids = batch.completion_ids.new_zeros(2 * B, L)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    C = batch.completion_ids.shape[1]
    # hidden position start-1+t predicts completion token t
    gather_at = torch.tensor(starts, device=ids.device)[:, None] - 1 + torch.arange(C, device=ids.device)[None, :]  # (2B, C)
    gather_at = gather_at.clamp(max=L - 1)
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state  # (2B, L, H)
        hidden = hidden.gather(1, gather_at[..., None].expand(-1, -1, hidden.shape[-1]))  # (2B, C, H)
        return _gather_completion_logps(head, hidden, batch.completion_ids, batch.completion_lens, chunk_tokens=512)
    logits = _up(model(input_ids=ids, attention_mask=mask).logits)  # (2B, L, V): exact for any architecture
    logits = logits.gather(1, gather_at[..., None].expand(-1, -1, logits.shape[-1]))  # (2B, C, V)
    logps = logits.log_softmax(-1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)  # (2B, C)
    valid = torch.arange(C, device=ids.device)[None, :] < batch.completion_lens[:, None]
    return (logps * valid).sum(-1)


def sequence_logps(model, batch: PairBatch, *, mode: str = "prefix", chunk_tokens: int = 512) -> torch.Tensor:
    """Summed log-probs of each completion given its prompt.  -> (2B,) interleaved chosen_0, rejected_0, ...

    mode: "prefix" shares the prompt pass between chosen and rejected; "concat" runs them separately.
    chunk_tokens: completion positions sent through the LM head at once; bounds logits memory.
    """
    parts = _causal_lm_parts(model)
    if mode == "prefix" and parts is not None:
        try:
            return _prefix_forward(*parts, batch, chunk_tokens)
        except (AttributeError, TypeError, NotImplementedError) as exc:
            # an architecture whose cache can't be repeated or extended with explicit positions
            _note_fallback(model, f"{type(exc).__name__}: {exc}")
    elif mode == "prefix":
        _note_fallback(model, "the LM head can't be separated from the body")
    return _concat_forward(model, parts, batch)


class PairForward(torch.nn.Module):
    """Wraps a causal LM so that data-parallel engines (DDP, FSDP, DeepSpeed) see the whole pair forward."""

    def __init__(self, model: torch.nn.Module, *, mode: str = "prefix", chunk_tokens: int = 512):
        super().__init__()
        self.model = model
        self.mode = mode
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: PairBatch) -> torch.Tensor:  # -> (2B,)
        return sequence_logps(self.model, batch, mode=self.mode, chunk_tokens=self.chunk_tokens)
