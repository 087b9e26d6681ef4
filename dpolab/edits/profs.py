"""ProFS (a.k.a. DeTox; Uppaal et al. 2024, "Model Editing as a Robust and Denoised variant of DPO", arXiv:2405.13967,
§4): find a "toxic" subspace from the embeddings of preference pairs and project it out of the MLP output weights.

Per edited layer l, with X+ (n, d) the preferred replies' embeddings and X- (n, d) the non-preferred ones:
  1. differences   D = X- - X+                                               (paired, one row per pair)
  2. centring      D_c = D (I - mu mu^T), mu the unit mean embedding of the layer (the corpus-mean / "stop word"
                   direction that every reply shares; the paper's P_mu)
  3. subspace      U = the top-k right singular vectors of D_c                                  (k, d)
  4. edit          W_down <- (I - U^T U) W_down                                                 (d, N)
so the layer can no longer write along U into the residual stream. k = 0 leaves the weights as they are.

Embeddings are `dpolab.explain.activations.reply_activations`: each layer's residual output averaged over the reply
tokens, the first reply token left out, in float64. Dimensions with massive activations (`massive_dims`) are
zeroed in the embeddings and excluded from every direction, so an edit can never remove one: a prototype that
pooled all tokens found the first token's massive dimension as its top "toxic" direction and doubled perplexity.

Centring here uses the mean of all chosen and rejected embeddings of the layer (both replies of every pair); the
paper's mean is over its (non-toxic) corpus embeddings. Because D_c^T D_c = sum_i d_i d_i^T, the subspace does not
change when a pair's chosen and rejected swap: a shuffled placebo finds exactly the same edit.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from dpolab.data.schema import PreferencePair
from dpolab.edits import EDITS, EditReport, LayerEdit, LayerSpec, parse_layers
from dpolab.errors import ConfigError, DataError

MAX_SINGULAR_VALUES = 32  # how many of each layer's singular values the report keeps


@dataclass(frozen=True)
class Subspace:
    """Directions chosen for one layer.

    basis: (r, d) orthonormal rows, zero on excluded dimensions; r <= k.
    singular_values: (m,) of the layer's centred differences, largest first (for the report, for both kinds).
    explained: share of ||D_c||_F^2 inside span(basis).
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    explained: float


class Chooser(Protocol):
    """What an entry of EDITS is: the directions to remove from one layer."""

    def __call__(self, chosen: torch.Tensor, rejected: torch.Tensor, *, k: int, allowed: torch.Tensor,
                 seed: int) -> Subspace: ...


def centred_differences(chosen: torch.Tensor, rejected: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """D_c = (X- - X+)(I - mu mu^T) with excluded dimensions zeroed first (ProFS §4, the centring step).

    chosen, rejected: (n, d) embeddings of the pairs' preferred and non-preferred replies.
    allowed: (d,) bool, False on dimensions left out (massive activations).
    """
    keep = allowed.to(torch.float64)  # (d,)
    x_pos = chosen.to(torch.float64) * keep  # (n, d)
    x_neg = rejected.to(torch.float64) * keep  # (n, d)
    diff = x_neg - x_pos  # (n, d)
    mu = torch.cat([x_pos, x_neg]).mean(0)  # (d,)
    norm = mu.norm()
    if norm == 0:
        return diff
    mu = mu / norm
    return diff - torch.outer(diff @ mu, mu)  # (n, d) each row minus its component along mu


def _explained(centred: torch.Tensor, basis: torch.Tensor) -> float:
    total = float(centred.pow(2).sum())
    return float((centred @ basis.T).pow(2).sum()) / total if total > 0 else 0.0


def toxic_subspace(chosen: torch.Tensor, rejected: torch.Tensor, k: int, allowed: torch.Tensor) -> Subspace:
    """The top-k right singular vectors of the centred differences, inside the allowed dimensions (ProFS §4).

    k: directions wanted; fewer are returned when D_c has lower rank, since a direction with singular value 0 is
    an arbitrary one (it could be the mean direction itself).
    Each direction's sign is fixed (its largest entry positive); the projection U^T U does not depend on it.
    """
    if k < 0:
        raise ConfigError(f"k must be >= 0, not {k}")
    centred = centred_differences(chosen, rejected, allowed)  # (n, d)
    n, d = centred.shape
    dims = torch.nonzero(allowed).flatten()  # (d_a,)
    s = torch.zeros(0, dtype=torch.float64)
    basis = torch.zeros((0, d), dtype=torch.float64)
    if n and len(dims):
        _, s, vh = torch.linalg.svd(centred[:, dims], full_matrices=False)  # s (m,), vh (m, d_a)
        tol = (s[0] * max(n, len(dims)) * torch.finfo(torch.float64).eps) if len(s) else 0.0
        r = min(k, int((s > tol).sum()))
        top = vh[:r]  # (r, d_a)
        signs = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))  # (r, 1)
        basis = torch.zeros((r, d), dtype=torch.float64)
        basis[:, dims] = top * signs
    return Subspace(basis=basis, singular_values=s, explained=_explained(centred, basis))


def random_subspace(d: int, k: int, allowed: torch.Tensor, seed: int) -> torch.Tensor:
    """(min(k, d_a), d) orthonormal rows drawn uniformly (QR of a Gaussian matrix) inside the allowed dimensions."""
    if k < 0:
        raise ConfigError(f"k must be >= 0, not {k}")
    dims = torch.nonzero(allowed).flatten()  # (d_a,)
    r = min(k, len(dims))
    basis = torch.zeros((r, d), dtype=torch.float64)
    if r:
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(len(dims), r, generator=gen, dtype=torch.float64))  # (d_a, r)
        basis[:, dims] = q.T
    return basis


def profs_directions(chosen: torch.Tensor, rejected: torch.Tensor, *, k: int, allowed: torch.Tensor,
                     seed: int) -> Subspace:
    """The EDITS entry "profs": the toxic subspace (the seed is unused; the SVD is deterministic)."""
    return toxic_subspace(chosen, rejected, k, allowed)


def random_directions(chosen: torch.Tensor, rejected: torch.Tensor, *, k: int, allowed: torch.Tensor,
                      seed: int) -> Subspace:
    """The EDITS entry "random-subspace": as many random directions as ProFS removes from the same data (k, or the
    rank of the centred differences if lower), in the same allowed dimensions; the spectrum and the share of the
    centred differences the random directions catch are kept for comparison."""
    found = toxic_subspace(chosen, rejected, k, allowed)
    centred = centred_differences(chosen, rejected, allowed)  # (n, d)
    basis = random_subspace(centred.shape[1], found.basis.shape[0], allowed, seed)  # (r, d)
    return Subspace(basis=basis, singular_values=found.singular_values, explained=_explained(centred, basis))


def project_out(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(I - U^T U) W, computed in float64 and returned in W's dtype (ProFS §4, the edit step).

    weight: (d, N) an nn.Linear(N -> d) weight, whose output lives in the residual stream.
    basis: (r, d) orthonormal rows U; r = 0 returns W unchanged.
    """
    w = weight.detach().to(torch.float64)  # (d, N)
    u = basis.to(torch.float64)  # (r, d)
    return (w - u.T @ (u @ w)).to(weight.dtype)  # (d, N)


@dataclass(frozen=True)
class HeldoutScore:
    nll: float  # mean negative log-likelihood per token, nats
    tokens: int


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, tokenizer, *, n_chunks: int = 8, chunk_tokens: int = 64) -> HeldoutScore:
    """Mean NLL per token on the first n_chunks consecutive chunks of chunk_tokens tokens of the shipped held-out
    text (the knowledge probe's perplexity text): a quick check of what an edit costs in language modelling."""
    from dpolab.banks import asset
    from dpolab.models.chat import ChatFormat
    from dpolab.models.scoring import text_scores

    fmt = ChatFormat(tokenizer)
    ids = fmt.ids(asset("heldout_text.txt").read_text(encoding="utf-8"))
    rows = [ids[i:i + chunk_tokens] for i in range(0, n_chunks * chunk_tokens, chunk_tokens)]
    rows = [r for r in rows if len(r) == chunk_tokens]
    was_training = model.training
    model.eval()
    try:
        scores = text_scores(model, rows, pad_id=fmt.pad_id, batch_size=len(rows) or 1)
    finally:
        model.train(was_training)
    tokens = sum(s.n_tokens for s in scores)
    return HeldoutScore(nll=-sum(s.logprob for s in scores) / max(tokens, 1), tokens=tokens)


def layer_seed(seed: int, layer: int) -> int:
    """Each layer's own stream of random directions, fixed by the cell's seed."""
    return seed * 100_003 + layer


@torch.no_grad()
def apply_edit(model: torch.nn.Module, tokenizer, pairs: Sequence[PreferencePair], *, kind: str = "profs",
               layers: LayerSpec = None, k: int = 10, seed: int = 0, batch_size: int = 8,
               measure_nll: bool = True) -> EditReport:
    """Edit `model` in place: each chosen layer's down_proj weight loses the directions `kind` picks.

    kind: a name in EDITS. layers: see dpolab.edits.parse_layers (None: the upper half). k: directions per layer.
    seed: the random-subspace control's draw (per layer, see layer_seed). batch_size: replies per forward.
    measure_nll: score the held-out chunks before and after (a few forwards).
    A pair whose chosen or rejected reply pools no token (one token long) is left out of the SVD and counted in
    the report's pairs_dropped.
    """
    from dpolab.explain.activations import Sample, down_projections, massive_dims, reply_activations

    choose: Chooser = EDITS.get(kind)
    downs = down_projections(model)
    chosen_layers = parse_layers(layers, len(downs))
    if k < 0:
        raise ConfigError(f"k must be >= 0, not {k}")
    pairs = list(pairs)
    samples = [Sample(item_id=p.id, conversation=tuple(p.prompt), reply=reply, outcome=outcome)
               for p in pairs for reply, outcome in ((p.chosen, 0.0), (p.rejected, 1.0))]  # chosen, rejected, ...
    acts = reply_activations(model, tokenizer, samples, neurons=False, batch_size=batch_size)
    tokens = acts.tokens.view(len(pairs), 2)  # (n, 2) pooled tokens of chosen, rejected
    used = (tokens > 0).all(1)  # (n,)
    dropped_ids = [p.id for p, ok in zip(pairs, used.tolist()) if not ok]
    report = EditReport(kind=kind, k=k, layers=chosen_layers, seed=seed, pairs_total=len(pairs),
                        pairs_used=int(used.sum()), dropped_ids=dropped_ids,
                        pairs_dropped={"a reply of one token (nothing pooled after the first)": len(dropped_ids)}
                        if dropped_ids else {})
    if not report.pairs_used:
        raise DataError(f"no pair can be embedded for the {kind} edit: all {len(pairs)} have a reply of at most one "
                        "token, and the first reply token is left out of the pooling")
    residual = acts.residual.view(len(pairs), 2, *acts.residual.shape[1:])[used]  # (n_used, 2, L, d)
    massive = massive_dims(residual.flatten(0, 1))  # (L, d)
    if measure_nll:
        before = heldout_nll(model, tokenizer)
        report.nll_before, report.heldout_tokens = before.nll, before.tokens
    for l in chosen_layers:
        allowed = ~massive[l]  # (d,)
        sub = choose(residual[:, 0, l], residual[:, 1, l], k=k, allowed=allowed, seed=layer_seed(seed, l))
        weight = downs[l].weight  # (d, N)
        edited = project_out(weight, sub.basis)
        change = float((edited.double() - weight.double()).norm() / weight.double().norm().clamp(min=1e-300))
        weight.copy_(edited)
        if downs[l].bias is not None:  # the bias writes into the residual stream too
            downs[l].bias.copy_(project_out(downs[l].bias[:, None], sub.basis)[:, 0])
        report.per_layer.append(LayerEdit(
            layer=l, rank=int(sub.basis.shape[0]), massive_dims=torch.nonzero(massive[l]).flatten().tolist(),
            singular_values=[float(x) for x in sub.singular_values[:MAX_SINGULAR_VALUES]],
            explained=sub.explained, weight_change=change))
    if measure_nll:
        report.nll_after = heldout_nll(model, tokenizer).nll
    return report
