"""The DPO-family losses: one pure function per file, one registry of their names, and the call the trainer makes.

Adding a loss: a new file with `def name(lp: SequenceLogps, *, option: type = default) -> LossOutput`, one
line in LOSSES, and (if it never reads the reference) the @reference_free decorator. CLI help, config
validation and the tests all read LOSSES.names() and loss_options(name).
"""
from __future__ import annotations

import inspect
import typing
from typing import Any

from dpolab.errors import ConfigError
from dpolab.losses.base import LossOutput, SequenceLogps
from dpolab.registry import Registry

LOSSES = Registry(
    "loss",
    {
        "dpo": "dpolab.losses.sigmoid:dpo",
        "ipo": "dpolab.losses.ipo:ipo",
        "hinge": "dpolab.losses.hinge:hinge",
        "cdpo": "dpolab.losses.cdpo:cdpo",
        "robust": "dpolab.losses.robust:robust",
        "odpo": "dpolab.losses.odpo:odpo",
        "rdpo": "dpolab.losses.rdpo:rdpo",
        "simpo": "dpolab.losses.simpo:simpo",
        "sft": "dpolab.losses.sft:sft",
    },
)


def loss_options(name: str) -> dict[str, tuple[type, Any]]:
    """The keyword-only options of a loss, option -> (type, default), read from its signature.

    sft_weight is not listed: it belongs to compute_loss and applies to every loss.
    """
    fn = LOSSES.get(name)
    hints = typing.get_type_hints(fn)
    return {
        p.name: (hints[p.name], p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def needs_reference(name: str) -> bool:
    """Whether the loss reads the reference model's log-probs (False for simpo and sft)."""
    return not getattr(LOSSES.get(name), "reference_free", False)


def compute_loss(name: str, lp: SequenceLogps, *, sft_weight: float = 0.0, **options: Any) -> LossOutput:
    """Per-pair losses of the named loss, plus an optional NLL term on the chosen completion.

    options: the loss's own options (see loss_options(name)); an unknown one raises ConfigError listing
        the valid ones.
    sft_weight: weight w of the RPO term (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
        arXiv:2404.19733): loss += w·(−log π(y_w) / |y_w|), the per-token NLL of the chosen. Keeps the
        chosen likely while the margin grows. 0 (default) adds nothing. Rewards are unchanged.
    """
    fn = LOSSES.get(name)
    valid = loss_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for loss {name!r}; "
            f"valid options: {', '.join(valid)} (and sft_weight, for every loss)"
        )
    if sft_weight < 0:
        raise ConfigError(f"sft_weight must be >= 0, got {sft_weight!r}")
    out = fn(lp, **options)
    if sft_weight > 0:
        nll = -lp.chosen / lp.chosen_tokens  # (B,)
        out = LossOutput(
            losses=out.losses + sft_weight * nll,  # (B,)
            chosen_rewards=out.chosen_rewards,
            rejected_rewards=out.rejected_rewards,
        )
    return out


__all__ = ["LOSSES", "LossOutput", "SequenceLogps", "compute_loss", "loss_options", "needs_reference"]
