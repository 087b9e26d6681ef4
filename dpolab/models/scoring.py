"""Forward-pass scoring of token sequences: continuation log-probs, next-token log-probs over candidates, text NLL.

Everything here works on token ids with left padding, so the positions that matter sit at the right edge of the
batch and only those logits are materialised (`logits_to_keep`): a (B, T, V) logits tensor at V≈49k would cost
gigabytes for a batch of long dialogues.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextScore:
    """Summed log-probability of a text and how many of its tokens were scored."""

    logprob: float
    n_tokens: int

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats); exp of it is the perplexity."""
        return -self.logprob / max(self.n_tokens, 1)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows into (ids, attention_mask), both (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[b, width - len(row):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, as if the row were unpadded."""
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start:start + size]


def _by_length(lengths: Sequence[int]) -> list[int]:
    # Longest first: similar lengths share a batch (less padding) and an out-of-memory error shows up at once.
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 16,
) -> list[float]:
    """Summed log p(continuation | prompt) for each (prompt, continuation) pair of token rows.

    The pairs are sorted by length and run in batches; the result is in input order.
    """
    if len(prompts) != len(continuations):
        raise ValueError("prompts and continuations differ in length")
    out = [0.0] * len(prompts)
    rows = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    for batch in _batches(_by_length([len(r) for r in rows]), batch_size):
        ids, mask = left_pad([rows[i] for i in batch], pad_id)  # (B, T)
        keep = max(len(continuations[i]) for i in batch)
        if keep == 0:
            continue
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                       logits_to_keep=keep + 1).logits  # (B, keep+1, V)
        logps = logits[:, :-1].float().log_softmax(-1)  # (B, keep, V): position j predicts token T-keep+j
        targets = ids[:, -keep:]  # (B, keep)
        tok = logps.gather(-1, targets[..., None]).squeeze(-1)  # (B, keep)
        for b, i in enumerate(batch):
            c = len(continuations[i])
            out[i] = float(tok[b, keep - c:].sum()) if c else 0.0
    return out


@torch.inference_mode()
def grouped_continuation_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int = 32,
) -> list[list[float]]:
    """Summed log p(continuation | prompt) for several continuations of each prompt, running each prompt once.

    The prompts (e.g. a long dialogue history) go through the model once with a KV cache; the cache rows are
    repeated for each of the prompt's continuations (e.g. the options of a question), which then run as one
    short right-padded batch on top of it. Equal to `continuation_logprobs` on the concatenations, at a
    fraction of the cost when prompts are long and continuations short.

    batch_size: continuation rows per forward pass; prompts per pass = batch_size // (continuations per prompt).
    """
    out: list[list[float]] = [[0.0] * len(c) for c in continuations]
    widest = max((len(c) for c in continuations), default=1) or 1
    for batch in _batches(_by_length([len(p) for p in prompts]), max(1, batch_size // widest)):
        owner = [b for b, i in enumerate(batch) for _ in continuations[i]]
        conts = [list(c) for i in batch for c in continuations[i]]
        if not conts:
            continue
        ids, mask = left_pad([prompts[i] for i in batch], pad_id)  # (B, T)
        pos = positions(mask)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        sel = torch.tensor(owner, dtype=torch.long)  # (R,) prompt row of each continuation row
        first = res.logits[:, -1].float().log_softmax(-1)[sel]  # (R, V): predicts each continuation's 1st token
        width = max(len(c) for c in conts)
        cids = torch.full((len(conts), max(width, 1)), pad_id, dtype=torch.long)  # (R, W) right-padded
        cmask = torch.zeros_like(cids)
        for r, c in enumerate(conts):
            if c:
                cids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
                cmask[r, : len(c)] = 1
        tok = torch.zeros_like(cids, dtype=torch.float)  # (R, W) log-prob of each continuation token
        tok[:, 0] = first.gather(-1, cids[:, :1]).squeeze(-1)
        if width > 1:
            cache = res.past_key_values
            cache.reorder_cache(sel)  # repeat each prompt's cache rows once per continuation
            cpos = pos[sel, -1:] + 1 + torch.arange(width)  # (R, W) positions continue after the prompt
            logits = model(input_ids=cids, attention_mask=torch.cat([mask[sel], cmask], dim=1), position_ids=cpos,
                           past_key_values=cache, use_cache=True).logits  # (R, W, V)
            tok[:, 1:] = logits[:, :-1].float().log_softmax(-1).gather(-1, cids[:, 1:, None]).squeeze(-1)
        tok = tok * cmask  # (R, W) zero beyond each continuation's end
        r = 0
        for i in batch:
            for j in range(len(continuations[i])):
                out[i][j] = float(tok[r].sum())
                r += 1
    return out


@torch.inference_mode()
def next_token_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    candidate_ids: Sequence[int],
    *,
    pad_id: int,
    batch_size: int = 16,
) -> list[list[float]]:
    """log p(next token = c | prompt) over the whole vocabulary, for each candidate token id c, per prompt."""
    cand = torch.tensor(list(candidate_ids), dtype=torch.long)
    out: list[list[float]] = [[] for _ in prompts]
    for batch in _batches(_by_length([len(p) for p in prompts]), batch_size):
        ids, mask = left_pad([prompts[i] for i in batch], pad_id)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=1).logits
        logps = logits[:, -1].float().log_softmax(-1)[:, cand]  # (B, C)
        for b, i in enumerate(batch):
            out[i] = logps[b].tolist()
    return out


@torch.inference_mode()
def text_scores(
    model: torch.nn.Module,
    texts_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 4,
) -> list[TextScore]:
    """Summed log-prob of every token after the first, per row (the first has no context to be predicted from)."""
    out: list[TextScore] = [TextScore(0.0, 0)] * len(texts_ids)
    for batch in _batches(_by_length([len(t) for t in texts_ids]), batch_size):
        ids, mask = left_pad([texts_ids[i] for i in batch], pad_id)  # (B, T)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits  # (B, T, V)
        logps = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        valid = mask[:, :-1].bool() & mask[:, 1:].bool()  # both the context token and the predicted one are real
        for b, i in enumerate(batch):
            out[i] = TextScore(float(logps[b][valid[b]].sum()), int(valid[b].sum()))
    return out


def softmax(logps: Sequence[float]) -> list[float]:
    """Renormalise log-probs over a set of options into probabilities that sum to 1."""
    top = max(logps)
    exps = [math.exp(x - top) for x in logps]
    total = sum(exps)
    return [e / total for e in exps]


def expected_value(values: Sequence[float], logps: Sequence[float]) -> float:
    """E[value] under the distribution renormalised over the candidates, e.g. a 1-5 rating from digit log-probs."""
    return sum(v * p for v, p in zip(values, softmax(logps)))

