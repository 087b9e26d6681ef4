"""Forward passes over token rows: batch layout with cached prefixes, continuation log-probs, next-token log-probs
over candidates, text NLL.

Rows are left-padded, so the positions that matter sit at the right edge of the batch and only those logits are
materialised (`logits_to_keep`): a (B, T, V) logits tensor at V≈49k would cost gigabytes for a batch of long
dialogues. A row may start from a cached prefix (its keys and values from an earlier pass, see
`dpolab.models.generate.PrefixCache`): the batch then holds [pad | cached prefix | pad | new tokens] per row,
the cached part goes in as `past_key_values`, and only the new tokens are run.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to fp32 for the softmax; fp32 and fp64 stay as they are (a float64 model
    keeps float64 arithmetic end to end, which the exactness tests rely on)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass(frozen=True)
class TextScore:
    """Summed log-probability of a text and how many of its tokens were scored."""

    logprob: float
    n_tokens: int

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats); exp of it is the perplexity."""
        return -self.logprob / max(self.n_tokens, 1)


@dataclass(frozen=True)
class Prefix:
    """Keys and values of a row's first `length` tokens, computed by an earlier forward pass."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values, each (H, >= length, D)
    length: int


@dataclass
class Packed:
    """A batch laid out as [pad | cached prefix | pad | new tokens] per row; C = cached width."""

    ids: torch.Tensor  # (B, C+N) token ids; cached columns hold the prefix ids, pads hold pad_id
    mask: torch.Tensor  # (B, C+N) 1 on real tokens, cached or new
    pos: torch.Tensor  # (B, C+N) position of each token within its own row
    past: object | None  # a transformers DynamicCache over the first C columns, or None when C == 0
    cached: int  # C

    @property
    def new_ids(self) -> torch.Tensor:
        return self.ids[:, self.cached:]  # (B, N)


def pack(rows: Sequence[Sequence[int]], pad_id: int, *, prefixes: Sequence[Prefix | None] | None = None,
         config=None) -> Packed:
    """Lay out token rows for one forward pass; a row with a Prefix only runs its tokens after the prefix.

    Each prefix must leave at least one new token in its row (the last token's logits are always needed).
    """
    from transformers import DynamicCache

    prefixes = list(prefixes) if prefixes is not None else [None] * len(rows)
    cut = [p.length if p is not None else 0 for p in prefixes]
    if any(c >= len(r) for c, r in zip(cut, rows)):
        raise ValueError("a cached prefix must leave at least one new token in its row")
    C = max(cut, default=0)
    N = max(len(r) - c for r, c in zip(rows, cut))
    B = len(rows)
    ids = torch.full((B, C + N), pad_id, dtype=torch.long)
    mask = torch.zeros((B, C + N), dtype=torch.long)
    pos = torch.zeros((B, C + N), dtype=torch.long)
    for b, (row, c) in enumerate(zip(rows, cut)):
        n = len(row) - c
        t = torch.tensor(list(row), dtype=torch.long)
        ids[b, C - c:C], ids[b, C + N - n:] = t[:c], t[c:]
        mask[b, C - c:C], mask[b, C + N - n:] = 1, 1
        pos[b, C - c:C], pos[b, C + N - n:] = torch.arange(c), torch.arange(c, c + n)
    past = None
    if C > 0:
        first = next(p for p in prefixes if p is not None)
        layers = []
        for layer, (k0, v0) in enumerate(first.kv):
            H, D = k0.shape[0], k0.shape[-1]
            keys = torch.zeros((B, H, C, D), dtype=k0.dtype)  # (B, H, C, D); padded slots are masked out
            values = torch.zeros((B, H, C, v0.shape[-1]), dtype=v0.dtype)
            for b, p in enumerate(prefixes):
                if p is not None and p.length:
                    keys[b, :, C - p.length:] = p.kv[layer][0][:, : p.length]
                    values[b, :, C - p.length:] = p.kv[layer][1][:, : p.length]
            layers.append((keys, values))
        past = growing_cache(config, layers) if config is not None else DynamicCache(ddp_cache_data=layers)
    return Packed(ids=ids, mask=mask, pos=pos, past=past, cached=C)


class _GrowingLayer:
    """Mixin for transformers' DynamicLayer: keys and values live in a buffer with spare room at the end, so a
    decoding step writes its one new token in place instead of concatenating (copying) the whole cache per layer
    and step, which for a batch of long dialogues moves more memory than the model's weights.

    `keys`/`values` stay views of the valid length, so everything that reads a DynamicLayer works unchanged; an
    operation that replaces them (crop, batch selection) is noticed by identity and the buffer is rebuilt.
    """

    reserve = 64  # spare slots allocated beyond the current need

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.keys.shape[-2] if self.keys.numel() else 0
        need = old + key_states.shape[-2]
        buf = getattr(self, "_buf", None)
        if buf is None or buf[2] is not self.keys or need > buf[0].shape[-2]:
            cap = need + max(self.reserve, need // 2)
            k = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
            v = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
            if old:
                k[:, :, :old], v[:, :, :old] = self.keys, self.values
            buf = (k, v, None)
        k, v, _ = buf
        k[:, :, old:need], v[:, :, old:need] = key_states, value_states
        self.keys, self.values = k[:, :, :need], v[:, :, :need]
        self._buf = (k, v, self.keys)
        return self.keys, self.values


def growing_cache(config, layers: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A DynamicCache for `config` whose full-attention layers grow in place (`_GrowingLayer`), optionally filled
    with per-layer (keys, values) of shape (B, H, T, D). Other layer kinds (sliding windows...) are left as they are."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [_growing(layer) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for layer, kv in zip(cache.layers, layers or []):
        layer.update(*kv)
    return cache


def _growing(layer):
    grown = _GROWING.get(type(layer))
    if grown is None:
        grown = _GROWING[type(layer)] = type(f"Growing{type(layer).__name__}", (_GrowingLayer, type(layer)), {})
    return grown()


_GROWING: dict[type, type] = {}


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start:start + size]


def by_length(lengths: Sequence[int]) -> list[int]:
    """Indices longest first: similar lengths share a batch (less padding) and an out-of-memory error shows
    up at once, not at the end of a long run."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def batches(lengths: Sequence[int], size: int):
    """Index batches of at most `size`, grouped by length."""
    return _batches(by_length(lengths), max(1, size))


def run_new(model: torch.nn.Module, packed: Packed, **kwargs):
    """Forward the new tokens of a packed batch on top of its cached prefixes."""
    return model(input_ids=packed.new_ids, attention_mask=packed.mask, position_ids=packed.pos[:, packed.cached:],
                 past_key_values=packed.past, **kwargs)


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 16,
) -> list[float]:
    """Summed log p(continuation | prompt) for each (prompt, continuation) pair, each run in full.

    The reference for `grouped_continuation_logprobs`; pairs are sorted by length and run in batches.
    """
    if len(prompts) != len(continuations):
        raise ValueError("prompts and continuations differ in length")
    out = [0.0] * len(prompts)
    rows = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    for batch in batches([len(r) for r in rows], batch_size):
        keep = max(len(continuations[i]) for i in batch)
        if keep == 0:
            continue
        packed = pack([rows[i] for i in batch], pad_id)
        logits = run_new(model, packed, logits_to_keep=keep + 1).logits  # (B, keep+1, V)
        logps = upcast(logits[:, :-1]).log_softmax(-1)  # (B, keep, V): position j predicts token T-keep+j
        tok = logps.gather(-1, packed.ids[:, -keep:, None]).squeeze(-1)  # (B, keep)
        for b, i in enumerate(batch):
            c = len(continuations[i])
            out[i] = float(tok[b, keep - c:].sum()) if c else 0.0
    return out


def _shared_head(conts: Sequence[Sequence[int]]) -> int:
    """Tokens that every continuation starts with, leaving each at least one token of its own."""
    if not conts or min(len(c) for c in conts) == 0:
        return 0
    limit = min(len(c) for c in conts) - 1
    n = 0
    while n < limit and all(c[n] == conts[0][n] for c in conts):
        n += 1
    return n


@torch.inference_mode()
def grouped_continuation_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int = 32,
    prefixes: Sequence[Prefix | None] | None = None,
    block: bool | None = None,
) -> list[list[float]]:
    """Summed log p(continuation | prompt) for several continuations of each prompt, running each prompt once.

    Each prompt (e.g. a long dialogue history), extended by the tokens all its continuations share (e.g.
    "The answer is"), runs once with a KV cache. The continuations' own tails then run side by side in one row
    per prompt, each attending to the prompt and to itself only (a block attention mask), or, where the model's
    attention takes no custom mask, on copies of the cache rows. Equal to `continuation_logprobs` on the
    concatenations, at a fraction of the cost when prompts are long and continuations short.

    batch_size: prompts per pass (and continuation rows per chunk on the copying path).
    prefixes: optional cached prefix per prompt (`pack`).
    block: the block-mask path (default: when the model uses SDPA attention).
    """
    out: list[list[float]] = [[0.0] * len(c) for c in continuations]
    config = getattr(model, "config", None)
    for batch in batches([len(p) for p in prompts], batch_size):
        heads = [_shared_head(continuations[i]) for i in batch]
        rows = [list(prompts[i]) + list(continuations[i][0][:h]) if h else list(prompts[i])
                for i, h in zip(batch, heads)]
        packed = pack(rows, pad_id, config=config,
                      prefixes=[prefixes[i] for i in batch] if prefixes is not None else None)
        keep = max(heads) + 1
        res = run_new(model, packed, use_cache=True, logits_to_keep=keep)
        last = upcast(res.logits[:, -keep:]).log_softmax(-1)  # (B, keep, V): position j predicts token T-keep+j+1
        head_lp = []
        for b, (i, h) in enumerate(zip(batch, heads)):
            ids = torch.tensor(list(continuations[i][0][:h]), dtype=torch.long)
            head_lp.append(float(last[b, keep - 1 - h: keep - 1].gather(-1, ids[:, None]).sum()) if h else 0.0)
        first = last[:, -1]  # (B, V): predicts the first token of each tail
        tails = [(b, j, list(continuations[i][j][h:])) for b, (i, h) in enumerate(zip(batch, heads))
                 for j in range(len(continuations[i]))]
        tok_lp = [[0.0] * len(continuations[i]) for i in batch]  # summed log-prob of each tail, per row
        for b, j, c in tails:
            if c:
                tok_lp[b][j] = float(first[b, c[0]])
        if block is None:
            block = takes_block_masks(config)
        if block:
            _tails_side_by_side(model, packed, res.past_key_values, tails, tok_lp, pad_id)
        else:
            _tails_on_copies(model, packed, res.past_key_values, tails, tok_lp, pad_id, batch_size)
        for b, i in enumerate(batch):
            out[i] = [head_lp[b] + x for x in tok_lp[b]]
    return out


def takes_block_masks(config) -> bool:
    """Whether the model's attention takes a custom 4-D boolean mask as given (SDPA does; eager would add it as numbers)."""
    return getattr(config, "_attn_implementation", None) == "sdpa"


def block_mask(prompt_mask: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Attention mask for segments placed side by side after a cached prompt row: every query sees its row's real
    prompt columns and the earlier columns of its own segment, nothing else.

    prompt_mask (B, K) True at real prompt columns; segment (B, W) an id per new column, equal within a segment
    (padding gets an id of its own). -> (B, 1, W, K + W), True = may attend.
    """
    B, W = segment.shape
    own = (segment[:, :, None] == segment[:, None, :]) & torch.ones(W, W, dtype=torch.bool, device=segment.device).tril()
    return torch.cat([prompt_mask.bool()[:, None, :].expand(B, W, prompt_mask.shape[1]), own], dim=-1)[:, None]


@dataclass
class SideBySide:
    """Several segments (completions, option tails) of one prompt placed one after another in that prompt's row,
    after its cached columns: [segment 0 | segment 1 | ... | padding].

    With `block_mask(prompt_mask, segment)` every token sees its prompt and the earlier tokens of its own segment,
    and positions restart at the row's first position for each segment, so each segment is computed exactly as if
    it ran alone after the prompt, while the prompt's cache is used once, uncopied. Training runs chosen and
    rejected this way (dpolab.training.logps), scoring the options of a stance check (`_tails_side_by_side`).
    """

    ids: torch.Tensor  # (B, W) token ids; pad_id in padding
    pos: torch.Tensor  # (B, W) position ids: first_pos + offset
    segment: torch.Tensor  # (B, W) segment index within the row; -1 = padding
    offset: torch.Tensor  # (B, W) index of the token inside its segment; 0 in padding
    starts: torch.Tensor  # (B, S) column where each segment begins

    def attention_mask(self, prompt_mask: torch.Tensor) -> torch.Tensor:
        return block_mask(prompt_mask, self.segment)  # (B, 1, W, K + W)


def side_by_side(segments: torch.Tensor, lengths: torch.Tensor, first_pos: torch.Tensor, *, pad_id: int) -> SideBySide:
    """Lay out S segments per row side by side (see SideBySide); vectorised, no Python loop over rows.

    segments (B, S, C) right-padded token ids; lengths (B, S) tokens of each segment (0: absent); first_pos (B,) the
    position of each segment's first token (the prompt's length).
    """
    B, S, C = segments.shape
    device = segments.device
    ends = lengths.cumsum(-1)  # (B, S)
    starts = ends - lengths  # (B, S)
    W = int(ends[:, -1].max()) if B else 0
    col = torch.arange(W, device=device)[None, :].expand(B, W)  # (B, W)
    seg = torch.searchsorted(ends, col.contiguous(), right=True)  # (B, W); S = past the last segment: padding
    real = seg < S
    seg_c = seg.clamp(max=S - 1)
    offset = torch.where(real, col - starts.gather(1, seg_c), 0)  # (B, W)
    flat = segments.reshape(B, S * C).gather(1, seg_c * C + offset.clamp(max=C - 1))  # (B, W)
    ids = torch.where(real, flat, pad_id)
    return SideBySide(ids=ids, pos=first_pos[:, None] + offset, segment=torch.where(real, seg, -1), offset=offset,
                      starts=starts)


def _tails_side_by_side(model, packed: Packed, cache, tails, tok_lp, pad_id: int) -> None:
    """Add each tail's log-probs after its first token to tok_lp[b][j]: all tails of prompt row b go in one row
    (`side_by_side`, tail j as segment j), each seeing exactly its prompt and itself; positions continue the
    prompt's."""
    B = packed.ids.shape[0]
    S = max((j + 1 for _, j, _ in tails), default=0)
    C = max((len(c) - 1 for _, _, c in tails), default=0)
    if C <= 0:
        return
    segments = torch.full((B, S, C), pad_id, dtype=torch.long)  # (B, S, C) tails without their last token
    lengths = torch.zeros((B, S), dtype=torch.long)
    for b, j, c in tails:
        if len(c) > 1:
            segments[b, j, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            lengths[b, j] = len(c) - 1
    lay = side_by_side(segments, lengths, packed.pos[:, -1] + 1, pad_id=pad_id)
    mask = lay.attention_mask(packed.mask)  # (B, 1, W, cached + W); every query sees its prompt (pad queries too: no empty row)
    logits = model(input_ids=lay.ids, attention_mask=mask, position_ids=lay.pos, past_key_values=cache, use_cache=True).logits
    logps = upcast(logits).log_softmax(-1)  # (B, W, V): column start+t predicts token t+1 of its tail
    for b, j, c in tails:
        if len(c) > 1:
            s = int(lay.starts[b, j])
            target = torch.tensor(c[1:], dtype=torch.long)
            tok_lp[b][j] += float(logps[b, s:s + len(c) - 1].gather(-1, target[:, None]).sum())


def _tails_on_copies(model, packed: Packed, cache, tails, tok_lp, pad_id: int, batch_size: int) -> None:
    """As `_tails_side_by_side`, for attention implementations that take no custom mask: each tail runs in its
    own row on a copy of its prompt's cache row, in chunks of similar length."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    K = packed.ids.shape[1]
    rest = [(b, j, c) for b, j, c in tails if len(c) > 1]
    for chunk in batches([len(t[2]) for t in rest], batch_size):
        sel = torch.tensor([rest[r][0] for r in chunk], dtype=torch.long)  # (R,) prompt row of each tail
        conts = [rest[r][2][:-1] for r in chunk]  # the last token predicts nothing we need
        width = max(len(c) for c in conts)
        cids = torch.full((len(conts), width), pad_id, dtype=torch.long)  # (R, W) right-padded
        cmask = torch.zeros_like(cids)
        for r, c in enumerate(conts):
            cids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
            cmask[r, : len(c)] = 1
        rows = DynamicCache(ddp_cache_data=[(k[:, :, :K].index_select(0, sel), v[:, :, :K].index_select(0, sel))
                                            for k, v in layers], config=config)  # the prompt's cache rows, once per tail
        cpos = packed.pos[sel, -1:] + 1 + torch.arange(width)  # (R, W) positions continue after the prompt
        logits = model(input_ids=cids, attention_mask=torch.cat([packed.mask[sel], cmask], dim=1),
                       position_ids=cpos, past_key_values=rows, use_cache=True).logits  # (R, W, V)
        logps = upcast(logits).log_softmax(-1)
        for r_i, r in enumerate(chunk):
            b, j, c = rest[r]
            target = torch.tensor(c[1:], dtype=torch.long)
            tok_lp[b][j] += float(logps[r_i, : len(c) - 1].gather(-1, target[:, None]).sum())


@torch.inference_mode()
def next_token_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    candidate_ids: Sequence[int],
    *,
    pad_id: int,
    batch_size: int = 16,
    prefixes: Sequence[Prefix | None] | None = None,
) -> list[list[float]]:
    """log p(next token = c | prompt) over the whole vocabulary, for each candidate token id c, per prompt."""
    cand = torch.tensor(list(candidate_ids), dtype=torch.long)
    out: list[list[float]] = [[] for _ in prompts]
    config = getattr(model, "config", None)
    for batch in batches([len(p) for p in prompts], batch_size):
        packed = pack([prompts[i] for i in batch], pad_id, config=config,
                      prefixes=[prefixes[i] for i in batch] if prefixes is not None else None)
        logits = run_new(model, packed, logits_to_keep=1).logits  # (B, 1, V)
        logps = upcast(logits[:, -1]).log_softmax(-1)[:, cand]  # (B, C)
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
    """Summed log-prob of every token after the first, per row (the first has no context to be predicted from);
    a row of fewer than two tokens scores nothing: TextScore(0.0, 0)."""
    out: list[TextScore] = [TextScore(0.0, 0)] * len(texts_ids)
    scorable = [i for i, t in enumerate(texts_ids) if len(t) > 1]
    for part in batches([len(texts_ids[i]) for i in scorable], batch_size):
        batch = [scorable[j] for j in part]
        packed = pack([texts_ids[i] for i in batch], pad_id)
        ids, mask = packed.ids, packed.mask  # (B, T)
        logits = run_new(model, packed).logits  # (B, T, V)
        logps = upcast(logits[:, :-1]).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
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
