"""Per-neuron decomposition of what training changed along a probe direction, with random-direction nulls.

Each MLP layer writes Σ_i m_i v_i into the residual stream (m_i the neuron's activation, v_i its value vector, the
i-th column of down_proj). Along a unit direction ŵ its contribution is c_i = m_i · (v_i · ŵ) (Yang et al. 2024,
"Ablation is not enough to emulate DPO", §3, after Geva et al. 2022), and a layer's c_i sum to its MLP output
projected on ŵ, exactly. Training changes both factors:

    c'_i − c_i = (m'_i − m_i) a_i  +  m'_i (a'_i − a_i),      a_i = v_i · ŵ

the activation change projected on the direction (the paper's quantity) and the change of the value vector. Means
are over the same replies' tokens for both models, so the change is the model's, not the text's.

Groups (the paper's): neurons by the sign of their alignment a_i (T: writes towards the behaviour, A: away from it)
and of their mean activation in the base model (P, N). When the net change is a reduction, each group has one way
to contribute to it: TP↓ (a toxic neuron dampened: the explanation ablation studies test), TN↑ (a toxic-aligned
neuron pushed further negative, writing anti-toxicity), AP↑ (an anti-toxic neuron activated more) and AN↓ (an
anti-toxic neuron's negative activation shrunk). A group's share is its part of the movement in the net direction;
neurons moving against it are the "opposing" sum. The paper found 31.8% of GPT-2's reduction in TP↓.

At small scale these shares are close to what any direction gives (a prototype on SmolLM2: 28.6/23.3/20.3/27.8%
for the probe, 28.4/21.1/21.0/29.5% averaged over 200 random directions), so every figure here comes with the
same figure for random unit directions: its null mean, 95% null interval and z-score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUPS = ("TP", "TN", "AP", "AN")  # alignment (T towards the behaviour, A away) x base activation sign (P, N)
GROUP_NAMES = {"TP": "TP↓ aligned, active, dampened", "TN": "TN↑ aligned, negative, pushed further negative",
               "AP": "AP↑ anti-aligned, active, raised", "AN": "AN↓ anti-aligned, negative, shrunk"}


@dataclass(frozen=True)
class Weights:
    """The value vectors of every MLP neuron: (L, d, N), each layer's down_proj weight."""

    values: np.ndarray

    @classmethod
    def of(cls, model) -> Weights:
        from dpolab.explain.activations import down_projections

        return cls(np.stack([p.weight.detach().double().cpu().numpy() for p in down_projections(model)]))


@dataclass(frozen=True)
class Figures:
    """What the decomposition says along one direction.

    shares: group -> share of the movement in the net direction (sums to 1 over the groups).
    opposing: movement against the net direction, as a fraction of the movement with it.
    net: Σ over neurons of the activation part (m' − m)·a.
    value_part: Σ of m'·(a' − a), the part from changed value vectors.
    layer_shift: (L,) change of each layer's mean MLP output along the direction (both parts).
    """

    shares: dict[str, float]
    opposing: float
    net: float
    value_part: float
    layer_shift: np.ndarray

    @property
    def total_shift(self) -> float:
        return float(self.layer_shift.sum())


@dataclass(frozen=True)
class Decomposition:
    """Per-neuron values along the probe direction; arrays are (L, N)."""

    alignment: np.ndarray  # a = v·ŵ in the base model
    alignment_tuned: np.ndarray
    m_base: np.ndarray  # mean activation over the replies' pooled tokens
    m_tuned: np.ndarray
    activation_part: np.ndarray  # (m' − m)·a
    value_part: np.ndarray  # m'·(a' − a)
    group: np.ndarray  # index into GROUPS
    figures: Figures


def group_of(alignment: np.ndarray, m_base: np.ndarray) -> np.ndarray:
    """(…) ints into GROUPS from the signs of alignment and base activation (0 counts as positive)."""
    return np.where(alignment >= 0, 0, 2) + np.where(m_base >= 0, 0, 1)


def _figures(a: np.ndarray, a2: np.ndarray, m: np.ndarray, m2: np.ndarray) -> list[Figures]:
    """Figures for R directions at once: a, a2 (L, N, R) alignments in the base and tuned model; m, m2 (L, N)."""
    act = (m2 - m)[..., None] * a  # (L, N, R)
    val = m2[..., None] * (a2 - a)  # (L, N, R)
    groups = group_of(a, m[..., None])  # (L, N, R)
    net = act.sum((0, 1))  # (R,)
    sign = np.where(net < 0, -1.0, 1.0)  # (R,)
    moved = act * sign  # (L, N, R) > 0: with the net
    with_net = np.clip(moved, 0, None)
    total_with = with_net.sum((0, 1))  # (R,)
    layer_shift = (act + val).sum(1)  # (L, R)
    out = []
    for r in range(a.shape[-1]):
        denom = total_with[r] if total_with[r] > 0 else np.nan
        shares = {g: float(with_net[..., r][groups[..., r] == k].sum() / denom) for k, g in enumerate(GROUPS)}
        out.append(Figures(shares=shares, opposing=float(np.clip(-moved[..., r], 0, None).sum() / denom),
                           net=float(net[r]), value_part=float(val[..., r].sum()), layer_shift=layer_shift[:, r]))
    return out


def alignments(weights: Weights, directions: np.ndarray) -> np.ndarray:
    """(L, N, R) v_i · u_r for unit directions (d, R)."""
    return np.einsum("ldn,dr->lnr", weights.values, directions)


def decompose(m_base: np.ndarray, m_tuned: np.ndarray, base: Weights, tuned: Weights, direction: np.ndarray) -> Decomposition:
    """The decomposition along `direction` (d,), normalised here. m_base, m_tuned: (L, N) mean activations of the
    two models over the same replies."""
    u = (direction / np.linalg.norm(direction))[:, None]  # (d, 1)
    a, a2 = alignments(base, u), alignments(tuned, u)
    fig = _figures(a, a2, m_base, m_tuned)[0]
    a, a2 = a[..., 0], a2[..., 0]
    return Decomposition(alignment=a, alignment_tuned=a2, m_base=m_base, m_tuned=m_tuned,
                         activation_part=(m_tuned - m_base) * a, value_part=m_tuned * (a2 - a),
                         group=group_of(a, m_base), figures=fig)


def random_directions(d: int, r: int, *, seed: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """(d, r) unit directions, uniform on the sphere of the allowed dimensions (0 elsewhere)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((d, r))
    if allowed is not None:
        u[~allowed] = 0.0
    return u / np.linalg.norm(u, axis=0, keepdims=True)


def null_figures(m_base: np.ndarray, m_tuned: np.ndarray, base: Weights, tuned: Weights, directions: np.ndarray,
                 *, chunk: int = 50) -> list[Figures]:
    """Figures for each column of `directions` (d, R), in chunks to bound memory ((L, N, chunk) per model)."""
    out: list[Figures] = []
    for s in range(0, directions.shape[1], chunk):
        u = directions[:, s:s + chunk]
        out += _figures(alignments(base, u), alignments(tuned, u), m_base, m_tuned)
    return out


@dataclass(frozen=True)
class NullBand:
    """A figure beside its distribution under random directions."""

    value: float
    null_mean: float
    null_low: float  # 2.5th percentile
    null_high: float  # 97.5th percentile
    z: float

    @classmethod
    def of(cls, value: float, null: np.ndarray) -> NullBand:
        null = np.asarray(null, dtype=float)
        null = null[~np.isnan(null)]
        if null.size < 2:
            return cls(value, np.nan, np.nan, np.nan, np.nan)
        sd = float(null.std(ddof=1))
        lo, hi = np.quantile(null, [0.025, 0.975])
        z = (value - float(null.mean())) / sd if sd > 0 else np.nan
        return cls(float(value), float(null.mean()), float(lo), float(hi), float(z))

    def to_json(self) -> dict[str, float | None]:
        clean = lambda x: None if x is None or np.isnan(x) else float(x)  # noqa: E731
        return {"value": clean(self.value), "null_mean": clean(self.null_mean), "null_low": clean(self.null_low),
                "null_high": clean(self.null_high), "z": clean(self.z)}


@dataclass(frozen=True)
class Bands:
    """Each figure of the probe's direction beside its random-direction null."""

    shares: dict[str, NullBand]
    opposing: NullBand
    layer_shift: list[NullBand]
    total_shift: NullBand
    net: NullBand


def bands(probe: Figures, null: list[Figures]) -> Bands:
    return Bands(
        shares={g: NullBand.of(probe.shares[g], np.array([f.shares[g] for f in null])) for g in GROUPS},
        opposing=NullBand.of(probe.opposing, np.array([f.opposing for f in null])),
        layer_shift=[NullBand.of(float(probe.layer_shift[l]), np.array([f.layer_shift[l] for f in null]))
                     for l in range(len(probe.layer_shift))],
        total_shift=NullBand.of(probe.total_shift, np.array([f.total_shift for f in null])),
        net=NullBand.of(probe.net, np.array([f.net for f in null])),
    )
