"""The forward pass: a batch of preference pairs -> summed completion log-probs, the prompt run once per pair.

This is the one function the trainer, the reference cache and the benchmarks call to turn pairs into
sequence log-probs. Two ways are implemented, and give the same numbers:

* ``prefix`` (default): the prompt runs once (right-padded, plain causal attention); then chosen and
  rejected run side by side in one row per pair, attending to the prompt's key/value cache and to their
  own earlier tokens only (a block mask; attention implementations without custom masks get the cache row
  repeated, one completion per row). Gradients flow back through the cache into the prompt pass. Only
  completion positions reach the LM head, in chunks, so full-vocabulary logits are never materialised for
  the prompt and never for more than ``chunk_tokens`` positions at a time.
* ``concat``: prompt + completion run as one sequence, once for chosen and once for rejected, the LM head
  still only on completion positions. The fallback for architectures whose cache can't be reused.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace

import torch

from dpolab.models.scoring import side_by_side, takes_block_masks, upcast

log = logging.getLogger(__name__)

FORWARD_MODES = ("prefix", "concat")


@dataclass
class PairBatch:
    """Tokenized pairs, padded. Masks come from lengths: SmolLM2's pad id is also its end-of-turn id."""

    ids: list[str]
    prompt_ids: torch.Tensor  # (B, P) right-padded
    prompt_lens: torch.Tensor  # (B,)
    completion_ids: torch.Tensor  # (2B, C) right-padded, interleaved: chosen_0, rejected_0, chosen_1, ...
    completion_lens: torch.Tensor  # (2B,)
    weights: torch.Tensor  # (B,)
    score_chosen: torch.Tensor | None = None  # (B,)
    score_rejected: torch.Tensor | None = None  # (B,)
    index: torch.Tensor | None = None  # (B,) positions of the pairs in their dataset, for the reference cache
    token_weights: torch.Tensor | None = None  # (2B, C) like completion_ids, 0 in padding; None: every token 1
    nullified: "PairBatch | None" = None  # the pairs that have a counterfactual prompt, with it as their prompt
    nullified_rows: torch.Tensor | None = None  # (b',) their positions in this batch

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        """Unique tokens the batch carries: each prompt once, both completions."""
        return int(self.prompt_lens.sum() + self.completion_lens.sum())

    def to(self, device) -> "PairBatch":
        moved = {k: (v.to(device) if isinstance(v, (torch.Tensor, PairBatch)) else v) for k, v in self.__dict__.items()}
        return PairBatch(**moved)


def collate_pairs(pairs, *, pad_id: int, index: list[int] | None = None) -> PairBatch:
    """Pad TokenizedPairs (dpolab.data) into a PairBatch; pairs with a counterfactual prompt also go, with it as
    their prompt, into its `nullified` batch."""
    rows = [i for i, p in enumerate(pairs) if p.nullified_prompt_ids is not None]
    nullified = None
    if rows:
        nullified = collate_pairs([replace(pairs[i], prompt_ids=pairs[i].nullified_prompt_ids,
                                                       nullified_prompt_ids=None) for i in rows], pad_id=pad_id)
    B = len(pairs)
    P = max(len(p.prompt_ids) for p in pairs)
    completions = [c for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    C = max(len(c) for c in completions)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    for i, p in enumerate(pairs):
        prompt_ids[i, : len(p.prompt_ids)] = torch.tensor(p.prompt_ids)
    completion_ids = torch.full((2 * B, C), pad_id, dtype=torch.long)
    for i, c in enumerate(completions):
        completion_ids[i, : len(c)] = torch.tensor(c)

    def scores(attr):
        values = [getattr(p, attr) for p in pairs]
        return None if any(v is None for v in values) else torch.tensor(values, dtype=torch.float32)

    token_weights = None
    if any(w is not None for p in pairs for w in (p.chosen_weights, p.rejected_weights)):
        token_weights = torch.zeros((2 * B, C), dtype=torch.float64)
        per = [w for p in pairs for w in (p.chosen_weights, p.rejected_weights)]
        for i, (c, w) in enumerate(zip(completions, per)):
            token_weights[i, : len(c)] = torch.tensor(w if w is not None else [1.0] * len(c), dtype=torch.float64)

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
        token_weights=token_weights,
        nullified=nullified,
        nullified_rows=torch.tensor(rows) if rows else None,
    )


def stack_batches(a: PairBatch, b: PairBatch, *, pad_id: int = 0) -> PairBatch:
    """a's pairs then b's in one batch (re-padded; masks come from lengths), for one forward pass over both."""
    def cat(x: torch.Tensor, y: torch.Tensor, fill) -> torch.Tensor:
        width = max(x.shape[1], y.shape[1])
        out = x.new_full((x.shape[0] + y.shape[0], width), fill)
        out[: x.shape[0], : x.shape[1]], out[x.shape[0]:, : y.shape[1]] = x, y
        return out

    def weights(batch: PairBatch) -> torch.Tensor:
        if batch.token_weights is not None:
            return batch.token_weights
        C = batch.completion_ids.shape[1]
        return (torch.arange(C, device=batch.completion_ids.device)[None, :] < batch.completion_lens[:, None]).double()

    tw = None
    if a.token_weights is not None or b.token_weights is not None:
        first = weights(a)
        tw = cat(first, weights(b).to(first.device), 0.0)
    return PairBatch(ids=a.ids + b.ids, prompt_ids=cat(a.prompt_ids, b.prompt_ids, pad_id),
                     prompt_lens=torch.cat([a.prompt_lens, b.prompt_lens]),
                     completion_ids=cat(a.completion_ids, b.completion_ids, pad_id),
                     completion_lens=torch.cat([a.completion_lens, b.completion_lens]),
                     weights=torch.cat([a.weights, b.weights]), token_weights=tw)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[y] for N positions, computed `chunk` rows at a time in forward and backward.

    Only (chunk, V) logits exist at any moment, in one buffer reused by every chunk and worked on in place
    (a fresh buffer per operation costs more in page faults than the arithmetic on this model). Backward
    recomputes the logits instead of storing them and reuses the forward's log-partition:
    p = exp(logits - lse),  d/dh = g (W_y - p W),  d/dW = (onehot_y - p)^T (g h),  d/db = sum (onehot_y - p) g.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # hidden (N, H), weight (V, H), targets (N,)
        N = hidden.shape[0]
        out = hidden.new_empty(N, dtype=upcast(hidden[:0]).dtype)
        lse = torch.empty_like(out)
        buf = _logits_buffer(weight, min(chunk, N))
        for s in range(0, N, chunk):
            logits = _logits_into(buf, hidden[s : s + chunk], weight, bias)  # (n, V)
            target = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
            peak = logits.amax(-1, keepdim=True)  # (n, 1)
            lse[s : s + chunk] = logits.sub_(peak).exp_().sum(-1).log_() + peak.squeeze(-1)
            out[s : s + chunk] = target - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, N = ctx.chunk, hidden.shape[0]
        acc = upcast(weight[:0]).dtype  # accumulate weight gradients in at least fp32
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        buf = _logits_buffer(weight, min(chunk, N))
        if grad_w is not None and N == 0:
            grad_w.zero_()
        for s in range(0, N, chunk):
            h = hidden[s : s + chunk]  # (n, H)
            y = targets[s : s + chunk, None]  # (n, 1)
            g = grad_out[s : s + chunk, None].to(acc)  # (n, 1)
            # dlogp/dlogits = onehot(y) - softmax, scaled by the incoming gradient: built in place in the buffer
            d = _logits_into(buf, h, weight, bias).sub_(lse[s : s + chunk, None]).exp_().mul_(-g).scatter_add_(-1, y, g)
            d_w = d if d.dtype == weight.dtype else d.to(weight.dtype)
            if grad_h is not None:
                torch.mm(d_w, weight, out=grad_h[s : s + chunk])  # (n, H)
            if grad_w is not None:
                h_acc = h.to(acc)
                if s == 0:
                    torch.mm(d.t(), h_acc, out=grad_w)  # (V, H)
                else:
                    grad_w.addmm_(d.t(), h_acc)
            if grad_b is not None:
                grad_b += d.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def _logits_buffer(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.empty(rows, weight.shape[0], dtype=upcast(weight[:0]).dtype, device=weight.device)


def _logits_into(buf: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h W^T + b for n <= len(buf) rows, written into buf[:n] (upcast when the weights are half precision)."""
    out = buf[: h.shape[0]]
    if weight.dtype == out.dtype:
        torch.mm(h, weight.t(), out=out)
    else:
        out.copy_(h @ weight.t())
    if bias is not None:
        out += bias
    return out


def token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, chunk_tokens: int = 512) -> torch.Tensor:
    """Log-probs of `targets` under the LM head at the given hidden states, never holding more than
    chunk_tokens x vocabulary logits.  hidden (N, H), targets (N,) -> (N,)"""
    if isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear:
        return _ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, chunk_tokens)
    # An adapter-wrapped or unusual head: call it per chunk with plain autograd (bounded in forward only).
    parts = []
    for s in range(0, hidden.shape[0], chunk_tokens):
        logits = upcast(head(hidden[s : s + chunk_tokens]))  # (n, V)
        parts.append(logits.gather(-1, targets[s : s + chunk_tokens, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(parts) if parts else hidden.new_zeros(0)


def causal_lm_parts(model):
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


_warned: set[str] = set()


def _note_fallback(model, reason: str) -> None:
    name = type(model).__name__
    if name not in _warned:
        _warned.add(name)
        log.warning("%s: prefix-shared forward unavailable (%s); using the concatenated forward", name, reason)


def _weighted(logps: torch.Tensor, batch: PairBatch, valid: torch.Tensor) -> torch.Tensor:
    """Token log-probs (N,), in the row-major order of the (2B, C) mask `valid`, times the batch's token weights
    (token-weighted DPO, dpolab.data.tokenization.emphasis_weights); unchanged when it has none."""
    if batch.token_weights is None:
        return logps
    return logps * batch.token_weights.to(device=logps.device)[valid].to(logps.dtype)


def _completion_mask(batch: PairBatch) -> torch.Tensor:
    C = batch.completion_ids.shape[1]
    return torch.arange(C, device=batch.completion_ids.device)[None, :] < batch.completion_lens[:, None]  # (2B, C)


def _gather_completion_logps(head, hidden, batch: PairBatch, chunk_tokens) -> torch.Tensor:
    """hidden[i, t] predicts completion_ids[i, t]; sum the (weighted) log-probs over each completion's length."""
    completion_ids = batch.completion_ids
    n, C = completion_ids.shape
    valid = _completion_mask(batch)  # (n, C)
    logps = _weighted(token_logps(head, hidden[valid], completion_ids[valid], chunk_tokens=chunk_tokens), batch, valid)  # (N,)
    row = torch.arange(n, device=completion_ids.device)[:, None].expand(n, C)[valid]  # (N,)
    return torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, row, logps)  # (n,)


def _prefix_forward(body, head, batch: PairBatch, chunk_tokens: int) -> torch.Tensor:
    B, P = batch.prompt_ids.shape
    prompt_mask = torch.arange(P, device=batch.prompt_ids.device)[None, :] < batch.prompt_lens[:, None]  # (B, P)
    with _kv_heads_unrepeated(body):
        # Prompts are right-padded, so plain causal attention is exact for every real token (padding comes after
        # them) and needs no mask: SDPA then skips the masked-out half of the score blocks. Later passes mask the
        # padding columns of the cache.
        out = body(input_ids=batch.prompt_ids, use_cache=True)
        last_prompt_hidden = out.last_hidden_state[torch.arange(B, device=prompt_mask.device), batch.prompt_lens - 1]  # (B, H)
        if takes_block_masks(getattr(body, "config", None)):
            return _completions_side_by_side(body, head, batch, out.past_key_values, prompt_mask, last_prompt_hidden, chunk_tokens)
        return _completions_on_copies(body, head, batch, out.past_key_values, prompt_mask, last_prompt_hidden, chunk_tokens)


def _completions_side_by_side(body, head, batch: PairBatch, cache, prompt_mask, last_prompt_hidden, chunk_tokens) -> torch.Tensor:
    """Chosen and rejected of a pair in one row after their prompt's cache row, [chosen | rejected | padding]
    (dpolab.models.scoring.side_by_side, shared with the probes' option scoring): each sees exactly prompt + itself,
    as if run alone; the prompt's cache is used as it is, with no copy per completion and no padding to the longest
    single completion.
    """
    B = prompt_mask.shape[0]
    device = batch.completion_ids.device
    lay = side_by_side(batch.completion_ids.view(B, 2, -1), batch.completion_lens.view(B, 2), batch.prompt_lens,
                       pad_id=0)  # the pad id never reaches a real token
    hidden = body(input_ids=lay.ids, attention_mask=lay.attention_mask(prompt_mask), position_ids=lay.pos,
                  past_key_values=cache, use_cache=True).last_hidden_state  # (B, W, H)
    # token t of a completion is predicted by the hidden state before it: the prompt's last for t = 0
    hidden = torch.cat([last_prompt_hidden[:, None], hidden], dim=1)  # (B, W + 1, H); index k holds the state before column k
    col = torch.arange(lay.ids.shape[1], device=device)[None, :]  # (1, W)
    source = torch.where(lay.offset == 0, 0, col)  # (B, W)
    valid = lay.segment >= 0
    states = hidden.gather(1, source[..., None].expand(-1, -1, hidden.shape[-1]))[valid]  # (N, H)
    logps = token_logps(head, states, lay.ids[valid], chunk_tokens=chunk_tokens)  # (N,)
    # row by row, chosen's tokens then rejected's: the same order as the (2B, C) completion mask
    logps = _weighted(logps, batch, _completion_mask(batch))
    row = (2 * torch.arange(B, device=device)[:, None] + lay.segment)[valid]  # interleaved: chosen_i, rejected_i
    return torch.zeros(2 * B, dtype=logps.dtype, device=device).index_add(0, row, logps)  # (2B,)


def _completions_on_copies(body, head, batch: PairBatch, cache, prompt_mask, last_prompt_hidden, chunk_tokens) -> torch.Tensor:
    """For attention implementations that take no custom mask: the prompt's cache row is repeated for chosen
    and rejected, each completion in its own row."""
    cache.batch_repeat_interleave(2)  # (2B, ...): chosen_i and rejected_i share prompt i
    C = batch.completion_ids.shape[1]
    comp_mask = torch.ones_like(batch.completion_ids)  # (2B, C); positions past a completion's end are causal-only
    mask = torch.cat([prompt_mask.long().repeat_interleave(2, dim=0), comp_mask], dim=1)  # (2B, P + C)
    pos = batch.prompt_lens.repeat_interleave(2)[:, None] + torch.arange(C, device=mask.device)[None, :]  # (2B, C)
    comp = body(input_ids=batch.completion_ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    hidden = torch.cat([last_prompt_hidden.repeat_interleave(2, dim=0)[:, None], comp.last_hidden_state[:, :-1]], dim=1)  # (2B, C, H)
    return _gather_completion_logps(head, hidden, batch, chunk_tokens)


@contextlib.contextmanager
def _kv_heads_unrepeated(body):
    """On CPU, let SDPA attend grouped-query heads directly (`enable_gqa`) even under a mask.

    transformers copies every key/value head out to the query heads when a mask is given, because CUDA's fast
    kernels can't take both; PyTorch's CPU kernel can, with the same result and a third less attention time.
    The switch is transformers' own environment variable, set for the duration of the call only.
    """
    params = next(body.parameters(), None)
    if params is None or params.device.type != "cpu" or os.environ.get(_GQA_ENV) is not None:
        yield
        return
    os.environ[_GQA_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(_GQA_ENV, None)


_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"


def _concat_forward(model, parts, batch: PairBatch) -> torch.Tensor:
    """Each of chosen and rejected as prompt + completion, right-padded, one forward for all 2B rows."""
    B = batch.prompt_ids.shape[0]
    rows, starts = [], []
    prompt_lens = batch.prompt_lens.tolist()
    for i in range(2 * B):
        p = batch.prompt_ids[i // 2, : prompt_lens[i // 2]]
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
        return _gather_completion_logps(head, hidden, batch, chunk_tokens=512)
    logits = upcast(model(input_ids=ids, attention_mask=mask).logits)  # (2B, L, V): exact for any architecture
    logits = logits.gather(1, gather_at[..., None].expand(-1, -1, logits.shape[-1]))  # (2B, C, V)
    logps = logits.log_softmax(-1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)  # (2B, C)
    valid = torch.arange(C, device=ids.device)[None, :] < batch.completion_lens[:, None]
    weights = valid if batch.token_weights is None else batch.token_weights.to(logps.device, logps.dtype) * valid
    return (logps * weights).sum(-1)


def sequence_logps(model, batch: PairBatch, *, mode: str = "prefix", chunk_tokens: int = 512) -> torch.Tensor:
    """Summed log-probs of each completion given its prompt.  -> (2B,) interleaved chosen_0, rejected_0, ...

    mode: "prefix" shares the prompt pass between chosen and rejected; "concat" runs them separately.
    chunk_tokens: completion positions sent through the LM head at once; bounds logits memory.
    """
    parts = causal_lm_parts(model)
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
