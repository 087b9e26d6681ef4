"""The DPO-family losses: one pure function per file, one registry of their names, and the call the trainer makes.

Adding a loss: a new file with `def name(lp: SequenceLogps, *, option: type = default) -> LossOutput`, one
line in LOSSES, and (if it never reads the reference) the @reference_free decorator. CLI help, config
validation and the tests all read LOSSES.names() and loss_options(name).

The names after `sft` are TRL's `loss_type` values (TRL 1.16 DPOTrainer), spelled as TRL spells them; TRL's
"sigmoid" is `dpo` here. tests/test_trl_losses.py checks every one against TRL's own code.
"""
from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping, Sequence
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
        "exo_pair": "dpolab.losses.exo_pair:exo_pair",
        "nca_pair": "dpolab.losses.nca_pair:nca_pair",
        "bco_pair": "dpolab.losses.bco_pair:bco_pair",
        "sppo_hard": "dpolab.losses.sppo_hard:sppo_hard",
        "aot": "dpolab.losses.aot:aot",
        "aot_unpaired": "dpolab.losses.aot_unpaired:aot_unpaired",
        "apo_zero": "dpolab.losses.apo_zero:apo_zero",
        "apo_down": "dpolab.losses.apo_down:apo_down",
        "discopop": "dpolab.losses.discopop:discopop",
        "sigmoid_norm": "dpolab.losses.sigmoid_norm:sigmoid_norm",
    },
)

LossName = typing.Union[str, Sequence[str]]  # one loss, or a list combined with weights


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


def needs_reference(name: LossName) -> bool:
    """Whether the loss reads the reference model's log-probs (False for simpo and sft); for a list of losses,
    whether any of them does."""
    names = [name] if isinstance(name, str) else list(name)
    return any(not getattr(LOSSES.get(n), "reference_free", False) for n in names)


def describe_loss(name: LossName, weights: Sequence[float] | None = None) -> str:
    """The loss as a short text for logs: "dpo", or "1·dpo + 0.2·sft" for a weighted list."""
    if isinstance(name, str):
        return name
    weights = [1.0] * len(name) if weights is None else weights
    return " + ".join(f"{w:g}·{n}" for n, w in zip(name, weights))


def check_combination(names: Sequence[str], weights: Sequence[float] | None,
                      options: Mapping[str, Any] | None = None) -> list[float]:
    """Validate a weighted list of losses and return its weights (1 each when None, as TRL's default).

    names: known, distinct (options are keyed by name), at least one.
    weights: one per name, each >= 0, not all 0.
    options: loss name -> that loss's options (beta excluded: it is shared, set once at the top of the config);
        every key a name in the list, every option one the loss declares.
    Raises ConfigError naming the field (loss, loss_weights, loss_args) and listing the valid choices.
    """
    names = list(names)
    if not names:
        raise ConfigError("loss: an empty list; give one loss name or a list of them")
    for n in names:
        LOSSES.check(n)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"loss: {', '.join(repeated)} listed twice; list each loss once and give it one weight")
    if weights is None:
        weights = [1.0] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ConfigError(f"loss_weights: {len(weights)} weight(s) for {len(names)} losses ({', '.join(names)}); "
                          "give one weight per loss, in the same order")
    bad = [w for w in weights if not (isinstance(w, (int, float)) and w >= 0)]
    if bad:
        raise ConfigError(f"loss_weights: every weight must be a number >= 0, got {bad[0]!r}")
    if not any(w > 0 for w in weights):
        raise ConfigError("loss_weights: all weights are 0, so nothing would be trained; give at least one > 0")
    for key, given in (options or {}).items():
        if key not in names:
            raise ConfigError(f"loss_args: {key!r} is not one of the listed losses; for a list of losses, loss_args "
                              f"maps each loss name to its options (valid keys: {', '.join(names)})")
        if not isinstance(given, Mapping):
            raise ConfigError(f"loss_args.{key}: expected a mapping of {key}'s options, got {given!r}")
        valid = [o for o in loss_options(key) if o != "beta"]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            shared = " (beta is shared by the losses: set it once, at the top)" if "beta" in unknown else ""
            raise ConfigError(f"loss_args.{key}: loss {key!r} has no option(s) {', '.join(unknown)}; "
                              f"valid: {', '.join(valid) or 'none'}{shared}")
    return [float(w) for w in weights]


def compute_loss(name: LossName, lp: SequenceLogps, *, weights: Sequence[float] | None = None,
                 sft_weight: float = 0.0, **options: Any) -> LossOutput:
    """Per-pair losses of the named loss (or of a weighted list of losses), plus an optional NLL term on the chosen
    completion.

    name: a loss name; options are then its own options (see loss_options(name)), and an unknown one raises
        ConfigError listing the valid ones.
    name as a list, e.g. ["dpo", "sft"] with weights [1.0, 0.2]: loss = Σ_k w_k·loss_k, per pair (TRL's
        `loss_type` list with `loss_weights`, as in MPO, arXiv:2411.10442). options then hold one mapping per
        loss name, dpo={"beta": 0.1}, sft={...} (a loss left out gets its defaults); weights default to 1 each.
        Rewards: the first listed loss's (TRL reports β·log-ratio whatever the losses, which is what the first
        reports when it is a reference-based loss). A loss with weight 0 is computed for validation and rewards
        only, and adds nothing (not even a NaN of its own).
    sft_weight: weight w of the RPO term (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
        arXiv:2404.19733): loss += w·(−log π(y_w) / |y_w|), the per-token NLL of the chosen. Keeps the
        chosen likely while the margin grows. 0 (default) adds nothing. Rewards are unchanged. Added once, to
        the combination as a whole.
    """
    if sft_weight < 0:
        raise ConfigError(f"sft_weight must be >= 0, got {sft_weight!r}")
    if isinstance(name, str):
        if weights is not None:
            raise ConfigError(f"weights apply to a list of losses; loss {name!r} is one (remove weights, or "
                              f"give a list such as [{name!r}, 'sft'])")
        out = _one(name, lp, options)
    else:
        out = _weighted(list(name), lp, weights, options)
    if sft_weight > 0:
        nll = -lp.chosen / lp.chosen_tokens  # (B,)
        out = LossOutput(
            losses=out.losses + sft_weight * nll,  # (B,)
            chosen_rewards=out.chosen_rewards,
            rejected_rewards=out.rejected_rewards,
        )
    return out


def _one(name: str, lp: SequenceLogps, options: Mapping[str, Any]) -> LossOutput:
    fn = LOSSES.get(name)
    valid = loss_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for loss {name!r}; "
            f"valid options: {', '.join(valid)} (and sft_weight, for every loss)"
        )
    return fn(lp, **options)


def _weighted(names: list[str], lp: SequenceLogps, weights: Sequence[float] | None,
              options: Mapping[str, Any]) -> LossOutput:
    # beta may appear in each loss's mapping here (the trainer passes the shared one to those that declare it)
    no_beta = {k: {o: v for o, v in opts.items() if o != "beta"} if isinstance(opts, Mapping) else opts
               for k, opts in options.items()}
    weights = check_combination(names, weights, no_beta)
    outs = [_one(n, lp, options.get(n, {})) for n in names]
    losses = sum(w * out.losses for w, out in zip(weights, outs) if w > 0)  # (B,)
    return LossOutput(losses=losses, chosen_rewards=outs[0].chosen_rewards, rejected_rewards=outs[0].rejected_rewards)


__all__ = ["LOSSES", "LossOutput", "SequenceLogps", "check_combination", "compute_loss", "describe_loss",
           "loss_options", "needs_reference"]
