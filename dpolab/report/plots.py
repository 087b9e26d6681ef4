"""The report's figures: matplotlib (Agg, no pyplot state) drawn to SVG and embedded as data: URIs.

An SVG inside <img> can run no script and needs no escaping, and text drawn as glyph paths needs no font on
the reader's machine. The hash salt and the missing date make the same inputs give the same bytes.
"""
from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BASELINE_COLOUR = "#404040"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5")
RC = {"svg.hashsalt": "dpolab-report", "svg.fonttype": "path", "font.size": 9, "axes.titlesize": 10,
      "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
      "legend.fontsize": 8, "legend.frameon": False}


def colour(i: int | None) -> str:
    """The colour of the i-th cell (None: the baseline), the same in every figure and table."""
    return BASELINE_COLOUR if i is None else PALETTE[i % len(PALETTE)]


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def to_data_uri(fig) -> str:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def as_float(x) -> float:
    """None (a missing value in JSON) as NaN."""
    return math.nan if x is None else float(x)


@dataclass
class Curve:
    """One model's accuracy by turn: value and CI at turns 0..T (NaN where missing)."""

    label: str
    colour: str
    value: list[float]
    low: list[float]
    high: list[float]
    baseline: bool = False


def persuasion_curves(panels: Sequence[tuple[str, list[Curve], list[Curve]]], turns: int) -> str:
    """DuET-PD accuracy per turn: one row per context, NEG (misleading) left and POS (corrective) right.

    panels: (context, NEG curves, POS curves); each list starts with the baseline.
    """
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = _figure(12, 2.6 * len(panels) + 0.3)
        axes = fig.subplots(len(panels), 2, squeeze=False, sharey=True)
        x = np.arange(turns + 1)
        for row, (context, neg, pos) in enumerate(panels):
            for col, (curves, name) in enumerate(((neg, "NEG: misleading persuasion"), (pos, "POS: corrective persuasion"))):
                ax = axes[row][col]
                width = 0.06 * max(len(curves) - 1, 1)
                for j, c in enumerate(curves):
                    dx = 0.0 if len(curves) == 1 else -width / 2 + width * j / (len(curves) - 1)
                    v, lo, hi = (np.array(a, dtype=float) for a in (c.value, c.low, c.high))
                    err = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
                    err = np.where(np.isnan(err), 0.0, err)
                    ax.errorbar(x + dx, v, yerr=err, color=c.colour, marker="o", ms=4, capsize=3, lw=1.6,
                                ls="--" if c.baseline else "-", label=c.label, zorder=3 if c.baseline else 2)
                ax.set_title(f"{context}: {name}", loc="left")
                ax.set_xticks(x, ["0"] + [str(t) for t in x[1:]])
                ax.set_ylim(-0.03, 1.03)
                ax.set_xlabel("turn")
                if col == 0:
                    ax.set_ylabel("accuracy")
                    ax.legend(loc="lower left")
        return to_data_uri(fig)


@dataclass
class Distribution:
    label: str
    colour: str
    values: list[float]


def distributions(panels: Sequence[tuple[str, list[Distribution]]]) -> str:
    """Side-by-side horizontal box plots with every value drawn as a jittered point and the mean as a diamond."""
    import matplotlib

    n = max(len(d) for _, d in panels)
    with matplotlib.rc_context(RC):
        fig = _figure(3.6 * len(panels) + 1.6, 0.42 * n + 1.0)
        axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
        rng = np.random.default_rng(0)
        for ax, (title, dists) in zip(axes, panels):
            ys = np.arange(len(dists))[::-1]
            for y, d in zip(ys, dists):
                vals = np.array([v for v in d.values if v is not None and not math.isnan(v)], dtype=float)
                if not len(vals):
                    continue
                ax.boxplot([vals], positions=[y], orientation="horizontal", widths=0.6, showfliers=False,
                           patch_artist=True, boxprops={"facecolor": d.colour + "33", "edgecolor": d.colour},
                           medianprops={"color": d.colour, "lw": 1.8}, whiskerprops={"color": d.colour},
                           capprops={"color": d.colour})
                ax.scatter(vals, y + rng.uniform(-0.22, 0.22, len(vals)), s=5, color=d.colour, alpha=0.45, lw=0, zorder=3)
                ax.scatter([vals.mean()], [y], marker="D", s=26, color="white", edgecolor=d.colour, lw=1.4, zorder=4)
            ax.set_yticks(ys, [d.label for d in dists])
            ax.set_title(title, loc="left")
            ax.grid(axis="y", alpha=0)
        return to_data_uri(fig)


@dataclass
class TrainLog:
    label: str
    colour: str
    steps: list[dict]


def _ema(y: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(y)
    acc = math.nan
    for i, v in enumerate(y):
        acc = v if math.isnan(acc) else (acc if math.isnan(v) else alpha * v + (1 - alpha) * acc)
        out[i] = acc
    return out


def training_curves(logs: Sequence[TrainLog]) -> str:
    """Loss, reward margin, chosen (solid) and rejected (dashed) rewards, and reward accuracy by step.

    With more than 30 steps the raw values are drawn faint and an exponential moving average over them bold.
    """
    import matplotlib

    panels = (("loss", ("loss",)), ("reward margin (chosen − rejected)", ("rewards/margins",)),
              ("rewards: chosen (solid), rejected (dashed)", ("rewards/chosen", "rewards/rejected")),
              ("reward accuracy (chosen > rejected)", ("rewards/accuracies",)))
    with matplotlib.rc_context(RC):
        fig = _figure(12, 5.2)
        axes = fig.subplots(2, 2).ravel()
        for ax, (title, keys) in zip(axes, panels):
            for log in logs:
                x = np.array([s.get("step", i + 1) for i, s in enumerate(log.steps)], dtype=float)
                for k, key in enumerate(keys):
                    y = np.array([as_float(s.get(key)) for s in log.steps], dtype=float)
                    ls = "-" if k == 0 else "--"
                    label = log.label if (k == 0 and ax is axes[0]) else None
                    if len(y) > 30:
                        ax.plot(x, y, color=log.colour, lw=0.8, alpha=0.25, ls=ls)
                        ax.plot(x, _ema(y, 2 / (1 + max(len(y) // 15, 2))), color=log.colour, lw=1.6, ls=ls, label=label)
                    else:
                        ax.plot(x, y, color=log.colour, lw=1.6, ls=ls, marker="o" if len(y) <= 12 else None, ms=3,
                                label=label)
            if "margin" in title or title.startswith("rewards"):
                ax.axhline(0, color="#888", lw=0.8)
            ax.set_title(title, loc="left")
            ax.set_xlabel("optimizer step")
        axes[0].legend(loc="best")
        return to_data_uri(fig)


def mechanism(layers: Sequence[dict], groups: dict[str, dict], title: str) -> str:
    """Left: each layer's shift of its MLP output along the probe direction (points) inside the 95% band of random
    directions (grey). Right: each neuron group's share of the change (points) beside its random-direction interval
    (grey bars): a point inside its grey is what any direction would show."""
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = _figure(12, 2.8)
        left, right = fig.subplots(1, 2, width_ratios=(3, 1.4))
        x = np.array([r["layer"] for r in layers], dtype=float)
        lo, hi, v = (np.array([as_float(r[k]) for r in layers]) for k in ("null_low", "null_high", "shift"))
        left.fill_between(x, lo, hi, color="#bbbbbb", alpha=0.6, lw=0, label="95% of random directions")
        outside = (v < lo) | (v > hi)
        left.plot(x, v, color=PALETTE[0], lw=1.2)
        left.scatter(x[~outside], v[~outside], color=PALETTE[0], s=14, zorder=3, label="probe direction")
        left.scatter(x[outside], v[outside], color=PALETTE[3], s=24, zorder=4, label="outside the null")
        left.axhline(0, color="#888", lw=0.8)
        left.set_xlabel("layer")
        left.set_title(f"{title}: change of each layer's MLP output along the probe", loc="left")
        left.legend(loc="best")
        names = list(groups)
        ys = np.arange(len(names))[::-1]
        for y, g in zip(ys, names):
            row = groups[g]
            right.plot([as_float(row["null_low"]), as_float(row["null_high"])], [y, y], color="#bbbbbb", lw=6,
                       solid_capstyle="butt")
            right.scatter([as_float(row["share"])], [y], color=PALETTE[0], s=30, zorder=3)
        right.set_yticks(ys, names)
        right.set_xlabel("share of the change")
        right.set_title("neuron groups vs random directions", loc="left")
        return to_data_uri(fig)
