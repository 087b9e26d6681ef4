"""A linear probe for a behaviour: logistic regression on pooled residual states, its held-out accuracy with a CI,
and its weight vector as a unit direction in the residual stream.

As in Lee et al. 2024 (arXiv:2401.01967, §3.1), whose toxicity probe Yang et al. project neurons onto, the probe
reads the last layer's residual stream averaged over the reply. Labels come from the behaviour's own per-reply
readings: binary outcomes as they are, a score split at its median (above = 1; with tied scores, the cut whose
classes are nearest equal), so the two classes are balanced
and the probe learns what separates more from less of the behaviour in this model's replies.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dpolab import stats
from dpolab.errors import DpolabError

MIN_PER_CLASS = 5  # fewer replies in a class than this: no probe


class ProbeError(DpolabError):
    """The replies do not support a probe (one class nearly empty)."""


@dataclass(frozen=True)
class ProbeFit:
    """direction: (d,) unit vector; positive = more of the behaviour (toxic, yielded).
    accuracy: held-out accuracy over grouped folds (no item in both train and test), CI over items.
    threshold: the score a label of 1 starts above (None for binary outcomes).
    """

    direction: np.ndarray
    accuracy: stats.Interval
    n: int
    positive_rate: float
    threshold: float | None
    layer: int


def labels(outcomes: Sequence[float]) -> tuple[np.ndarray, float | None]:
    """0/1 labels and the threshold used (None when the outcomes already are 0/1)."""
    y = np.asarray(outcomes, dtype=float)
    if np.isin(y, (0.0, 1.0)).all():
        return y.astype(int), None
    cuts = np.unique(y)[:-1]  # above the top value no reply would be 1
    if cuts.size == 0:
        return np.zeros(y.size, dtype=int), float(y[0]) if y.size else None
    balance = np.abs((y[None, :] > cuts[:, None]).mean(1) - 0.5)  # (cuts,)
    threshold = float(cuts[np.argmin(balance)])  # the median, or the cut nearest it when scores tie
    return (y > threshold).astype(int), threshold


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, y)


def fit_probe(features: np.ndarray, y: np.ndarray, groups: Sequence[str], *, layer: int, exclude: np.ndarray | None = None,
              folds: int = 5, c: float = 0.1, seed: int = 0, n_boot: int = 2000, threshold: float | None = None) -> ProbeFit:
    """Fit the probe on `features` (n, d) with labels `y` (n,); items in `groups` never straddle a fold.

    exclude: (d,) bool, dimensions left out of the features (massive activations); the direction is 0 there.
    c: inverse L2 strength on standardised features; small, because n (hundreds) is below d (hundreds to
        thousands) and an unregularised probe would separate any labels, real or random.
    """
    from sklearn.model_selection import GroupKFold

    y = np.asarray(y, dtype=int)
    counts = np.bincount(y, minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise ProbeError(f"the replies split {counts[0]} / {counts[1]} between the classes; a probe needs at least "
                         f"{MIN_PER_CLASS} in each (more replies, or a behaviour that varies in this model)")
    keep = np.ones(features.shape[1], dtype=bool) if exclude is None else ~exclude
    x = features[:, keep]
    groups = np.asarray(groups)
    k = min(folds, len(set(groups)))
    correct = np.zeros(len(y))
    for train_idx, test_idx in GroupKFold(n_splits=k).split(x, y, groups):
        if len(set(y[train_idx])) < 2:  # a fold with one class predicts it
            correct[test_idx] = y[test_idx] == y[train_idx][0]
            continue
        correct[test_idx] = _fit(x[train_idx], y[train_idx], c).predict(x[test_idx]) == y[test_idx]
    by_item = {g: correct[groups == g].mean() for g in dict.fromkeys(groups)}  # the item is the unit
    accuracy = stats.bootstrap_ci(list(by_item.values()), seed=seed, n_boot=n_boot)
    pipe = _fit(x, y, c)
    scaler, logit = pipe.steps[0][1], pipe.steps[1][1]
    w = np.zeros(features.shape[1])
    w[keep] = logit.coef_[0] / scaler.scale_  # back from standardised units to the residual stream's
    return ProbeFit(direction=w / np.linalg.norm(w), accuracy=accuracy, n=len(y), positive_rate=float(y.mean()),
                    threshold=threshold, layer=layer)
