"""The losses added from TRL's menu (their reward signs, AOT's batch-level sort) and weighted lists of losses:
the combination's maths, its config (loss: [dpo, sft] with loss_weights) and the errors of a bad one.
Their agreement with TRL's own code is tests/test_trl_losses.py."""
from __future__ import annotations

import math

import pytest
import torch

from dpolab.config import TrainConfig, dump_config, load_config
from dpolab.errors import ConfigError
from dpolab.losses import (LOSSES, SequenceLogps, check_combination, compute_loss, describe_loss, loss_options,
                           needs_reference)
from dpolab.training.loop import loss_arguments

NEW = ["exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
       "sigmoid_norm"]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def pairs(**overrides) -> SequenceLogps:
    """Four pairs; log-ratios chosen [1, -0.5, 2, 0.25], rejected [-1, 0.5, 1, -2]: margins of both signs."""
    values = dict(chosen=t([-4.0, -9.0, -2.0, -6.0]), rejected=t([-7.0, -5.0, -3.0, -8.0]),
                  chosen_tokens=t([3.0, 9.0, 2.0, 5.0]), rejected_tokens=t([6.0, 4.0, 3.0, 7.0]),
                  ref_chosen=t([-5.0, -8.5, -4.0, -6.25]), ref_rejected=t([-6.0, -5.5, -4.0, -6.0]))
    values.update(overrides)
    return SequenceLogps(**values)


# --- the new losses ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_rewards_are_beta_times_log_ratio_chosen_above_rejected_when_the_policy_prefers_it(name):
    """Sign convention: the reward of a completion is β·(log π − log π_ref), so a pair the policy has moved towards
    its chosen (chosen log-ratio up, rejected down) has chosen reward > rejected reward."""
    lp = pairs(chosen=t([-4.0, -8.0, -2.0, -6.0]), rejected=t([-7.0, -6.0, -5.0, -8.0]))  # log-ratios: + chosen, − rejected
    out = compute_loss(name, lp, beta=0.5)
    torch.testing.assert_close(out.chosen_rewards, 0.5 * (lp.chosen - lp.ref_chosen), rtol=0, atol=0)
    torch.testing.assert_close(out.rejected_rewards, 0.5 * (lp.rejected - lp.ref_rejected), rtol=0, atol=0)
    assert (out.chosen_rewards > 0).all() and (out.rejected_rewards < 0).all()


@pytest.mark.parametrize("name", [n for n in NEW if n != "discopop"])
def test_at_the_reference_favouring_the_chosen_lowers_the_loss(name):
    """At policy = reference, raising every chosen log-prob and lowering every rejected one by the same step
    lowers each new loss: they train towards the chosen (apo_down too: it lowers both, the rejected more).
    Not discopop at its default τ: see the next test."""
    logps = t([-4.0, -9.0, -2.0, -6.0])
    chosen, rejected = logps.clone().requires_grad_(), (logps - 1).clone().requires_grad_()
    lp = SequenceLogps(chosen=chosen, rejected=rejected, chosen_tokens=t([3.0, 9.0, 2.0, 5.0]),
                       rejected_tokens=t([6.0, 4.0, 3.0, 7.0]), ref_chosen=logps.clone(), ref_rejected=logps - 1)
    compute_loss(name, lp).losses.sum().backward()
    assert float(chosen.grad.sum() - rejected.grad.sum()) < 0  # directional derivative along (+1 chosen, −1 rejected)


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_discopop_slope_at_the_reference(tau):
    """DiscoPOP is not monotone: its mix switches from the logistic (log 2 at ρ = 0) to the exponential (1 at
    ρ = 0) over a width of about τ, so at ρ = β·h = 0 its slope is (1 − log 2)/(4τ) − 3/4: positive for
    τ < (1 − log 2)/3 ≈ 0.10, including the default 0.05, where the first steps from the reference push the
    margin down. TRL's code has the same shape (tests/test_trl_losses.py)."""
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    lp = SequenceLogps(chosen=h - 3.0, rejected=t([-4.0]), chosen_tokens=t([2.0]), rejected_tokens=t([3.0]),
                       ref_chosen=t([-3.0]), ref_rejected=t([-4.0]))
    compute_loss("discopop", lp, beta=1.0, tau=tau).losses.sum().backward()
    slope = (1 - math.log(2)) / (4 * tau) - 0.75
    assert float(h.grad) == pytest.approx(slope, rel=1e-12)
    assert (slope > 0) == (tau < (1 - math.log(2)) / 3)


def test_policy_equal_to_reference_values():
    """At h = 0 every reward is 0: the losses' values there, worked out by hand."""
    logps = t([-4.0, -9.0])
    lp = SequenceLogps(chosen=logps, rejected=logps - 2, chosen_tokens=t([3.0, 9.0]), rejected_tokens=t([6.0, 4.0]),
                       ref_chosen=logps.clone(), ref_rejected=logps - 2)
    expected = {
        "exo_pair": 0.5 * (math.log(0.5) - math.log1p(-1e-3)) + 0.5 * (math.log(0.5) - math.log(1e-3)),
        "nca_pair": 2 * math.log(2),  # log 2 + ½ log 2 + ½ log 2
        "bco_pair": 2 * math.log(2),
        "sppo_hard": 2 * (1 / (2 * 0.1)) ** 2,
        "aot": math.log(2), "aot_unpaired": math.log(2), "sigmoid_norm": math.log(2),
        "apo_zero": 1.0, "apo_down": 1.0,
        "discopop": 0.5 * math.log(2) + 0.5,  # m = σ(0) = ½: ½·log 2 + ½·e⁰
    }
    for name, value in expected.items():
        torch.testing.assert_close(compute_loss(name, lp).losses, t([value, value]), rtol=1e-14, atol=0, msg=name)


def test_aot_puts_each_quantile_loss_at_the_pair_of_that_policy_rank():
    """AOT's k-th loss compares the k-th smallest policy gap with the k-th smallest reference gap; it is returned
    at the pair whose policy gap has rank k, and its gradient reaches only that pair."""
    lp = pairs()
    beta = 0.5
    policy, reference = lp.chosen - lp.rejected, lp.ref_chosen - lp.ref_rejected  # [3, -4, 1, 2], [1, -3, 0, -0.25]
    expected = -torch.nn.functional.logsigmoid(beta * (policy - reference.sort().values[policy.argsort().argsort()]))
    torch.testing.assert_close(compute_loss("aot", lp, beta=beta).losses, expected, rtol=1e-14, atol=0)
    chosen = lp.chosen.clone().requires_grad_()
    out = compute_loss("aot", pairs(chosen=chosen), beta=beta)
    out.losses[2].backward()
    assert chosen.grad.nonzero().flatten().tolist() == [2]


def test_aot_of_one_pair_is_dpo():
    lp = SequenceLogps(chosen=t([-3.0]), rejected=t([-5.0]), chosen_tokens=t([2.0]), rejected_tokens=t([4.0]),
                       ref_chosen=t([-4.0]), ref_rejected=t([-4.5]))
    for name in ("aot", "aot_unpaired"):
        torch.testing.assert_close(compute_loss(name, lp, beta=0.3).losses, compute_loss("dpo", lp, beta=0.3).losses,
                                   rtol=1e-15, atol=0)


def test_discopop_is_finite_far_out():
    """exp(−ρ) alone overflows for very negative margins; the blend is computed without 0·∞."""
    lp = pairs(chosen=t([-4.0, -9.0, -2.0, -6.0]) - 5e4)
    out = compute_loss("discopop", lp, beta=0.1)
    assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize(("name", "option", "value", "match"), [
    ("exo_pair", "label_smoothing", 0.0, r"label_smoothing must be in \(0, 0.5\)"),
    ("exo_pair", "label_smoothing", 0.5, r"label_smoothing must be in \(0, 0.5\)"),
    ("aot", "label_smoothing", 0.5, r"label_smoothing must be in \[0, 0.5\)"),
    ("aot_unpaired", "label_smoothing", -0.1, r"label_smoothing must be in \[0, 0.5\)"),
    ("discopop", "tau", 0.0, "tau must be > 0"),
    ("sppo_hard", "beta", 0.0, "beta must be > 0"),
])
def test_bad_option_values(name, option, value, match):
    with pytest.raises(ConfigError, match=f"loss '{name}'.*{match}"):
        compute_loss(name, pairs(), **{option: value})


# --- weighted lists of losses -----------------------------------------------------------------------------------


def test_combination_is_the_weighted_sum_with_the_first_losss_rewards():
    lp = pairs()
    combined = compute_loss(["simpo", "dpo", "sft"], lp, weights=[0.5, 1.0, 0.2], simpo={"beta": 2.0, "gamma": 0.5},
                            dpo={"beta": 0.3})
    parts = [compute_loss("simpo", lp, beta=2.0, gamma=0.5), compute_loss("dpo", lp, beta=0.3), compute_loss("sft", lp)]
    torch.testing.assert_close(combined.losses, 0.5 * parts[0].losses + 1.0 * parts[1].losses + 0.2 * parts[2].losses,
                               rtol=1e-15, atol=0)
    assert torch.equal(combined.chosen_rewards, parts[0].chosen_rewards)
    assert torch.equal(combined.rejected_rewards, parts[0].rejected_rewards)


@pytest.mark.parametrize("name", LOSSES.names())
def test_a_list_of_one_loss_with_weight_one_is_that_loss(name):
    lp = pairs(score_chosen=t([5.0, 6.0, 7.0, 8.0]), score_rejected=t([1.0, 2.0, 3.0, 4.0]))
    alone, listed = compute_loss(name, lp), compute_loss([name], lp, weights=[1.0])
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        assert torch.equal(getattr(listed, field), getattr(alone, field)), field


def test_zero_weight_adds_nothing_and_sft_weight_is_added_once():
    lp = pairs()
    dpo = compute_loss("dpo", lp)
    torch.testing.assert_close(compute_loss(["dpo", "ipo"], lp, weights=[1.0, 0.0]).losses, dpo.losses, rtol=0, atol=0)
    with_rpo = compute_loss(["dpo", "ipo"], lp, weights=[1.0, 0.0], sft_weight=0.5).losses
    torch.testing.assert_close(with_rpo, dpo.losses + 0.5 * (-lp.chosen / lp.chosen_tokens), rtol=1e-15, atol=0)


def test_compute_loss_errors_for_lists():
    lp = pairs()
    with pytest.raises(ConfigError, match="weights apply to a list of losses"):
        compute_loss("dpo", lp, weights=[1.0])
    with pytest.raises(ConfigError, match=r"loss_weights: 1 weight\(s\) for 2 losses"):
        compute_loss(["dpo", "sft"], lp, weights=[1.0])
    with pytest.raises(ConfigError, match=r"loss_args.dpo: loss 'dpo' has no option\(s\) gamma; valid: none"):
        compute_loss(["dpo", "sft"], lp, dpo={"gamma": 1.0})
    with pytest.raises(ConfigError, match="loss_args: 'simpo' is not one of the listed losses"):
        compute_loss(["dpo", "sft"], lp, simpo={"gamma": 1.0})
    with pytest.raises(ConfigError, match=r"unknown loss 'dpx' \(did you mean 'dpo'\?\)"):
        compute_loss(["dpx"], lp)


def test_needs_reference_and_describe_for_lists():
    assert not needs_reference(["simpo", "sft"]) and needs_reference(["sft", "dpo"])
    assert describe_loss("dpo") == "dpo"
    assert describe_loss(["dpo", "sft"], [1.0, 0.2]) == "1·dpo + 0.2·sft"
    assert check_combination(["dpo", "sft"], None) == [1.0, 1.0]


# --- the config -----------------------------------------------------------------------------------------------


def config(**keys) -> TrainConfig:
    return load_config(TrainConfig, None, keys)


def test_a_single_loss_config_is_unchanged():
    """No loss_weights key in a single loss's resolved config (OUT/config.yaml) or its arguments."""
    cfg = config(loss="dpo")
    assert cfg.loss == "dpo" and cfg.loss_weights is None
    dumped = cfg.model_dump(mode="json")
    assert "loss_weights" not in dumped and "loss_weights" not in dump_config(cfg)
    assert list(dumped) == [f for f in TrainConfig.model_fields if f != "loss_weights"]
    assert loss_arguments(cfg) == {"beta": 0.1}
    assert loss_arguments(config(loss="simpo", loss_args={"gamma": 0.5})) == {"beta": 2.0, "gamma": 0.5}


def test_a_list_config_resolves_weights_and_shared_beta_and_round_trips():
    cfg = config(loss=["dpo", "simpo", "sft"], beta=0.5, loss_args={"simpo": {"gamma": 0.3}})
    assert cfg.loss_weights == [1.0, 1.0, 1.0] and cfg.beta == 0.5
    assert loss_arguments(cfg) == {"weights": [1.0, 1.0, 1.0], "dpo": {"beta": 0.5},
                                   "simpo": {"beta": 0.5, "gamma": 0.3}, "sft": {"beta": 0.5}}
    again = load_config(TrainConfig, None, cfg.model_dump(mode="json"))
    assert again == cfg
    given = config(loss=["dpo", "sft"], loss_weights=[1, 0.2])
    assert given.beta == 0.1 and given.loss_weights == [1.0, 0.2]
    unset = config(loss=["dpo", "sft"])
    # resolved defaults (beta, weights) do not stick when the loss changes, as resolve_config re-resolves them
    assert not {"beta", "loss_weights"} & unset.model_fields_set
    changed = config(**{**unset.model_dump(exclude_unset=True), "loss": "simpo"})
    assert changed.beta == 2.0 and changed.loss_weights is None


def test_the_weighted_config_trains_the_weighted_loss():
    cfg = config(loss=["dpo", "sft"], loss_weights=[1.0, 0.2])
    lp = pairs()
    combined = compute_loss(cfg.loss, lp, **loss_arguments(cfg)).losses
    expected = compute_loss("dpo", lp, beta=0.1).losses + 0.2 * compute_loss("sft", lp).losses
    torch.testing.assert_close(combined, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize(("keys", "match"), [
    ({"loss": ["dpo", "sft"], "loss_weights": [1.0]}, r"loss_weights: 1 weight\(s\) for 2 losses"),
    ({"loss": ["dpo", "sft"], "loss_weights": [1.0, -0.2]}, "loss_weights: every weight must be a number >= 0"),
    ({"loss": ["dpo", "sft"], "loss_weights": [0, 0]}, "loss_weights: all weights are 0"),
    ({"loss": "dpo", "loss_weights": [1.0]}, "loss_weights needs a list of losses"),
    ({"loss": ["dpo", "dpx"]}, r"loss: unknown loss 'dpx' \(did you mean 'dpo'\?\)"),
    ({"loss": []}, "loss: an empty list"),
    ({"loss": ["dpo", "dpo"]}, "loss: dpo listed twice"),
    ({"loss": ["dpo", "sft"], "loss_args": {"gamma": 1.0}}, "loss_args: 'gamma' is not one of the listed losses"),
    ({"loss": ["dpo", "simpo"], "beta": 1.0, "loss_args": {"simpo": {"gama": 1.0}}},
     "loss_args.simpo: loss 'simpo' has no option.s. gama; valid: gamma"),
    ({"loss": ["dpo", "simpo"], "beta": 1.0, "loss_args": {"simpo": {"beta": 1.0}}}, "beta is shared"),
    ({"loss": ["dpo", "simpo"]}, r"beta is shared .* their own defaults differ \(dpo 0.1, simpo 2.0\); set beta"),
])
def test_bad_list_configs_name_the_field(keys, match):
    with pytest.raises(ConfigError, match=match):
        config(**keys)


def test_new_losses_validate_in_a_config():
    for name in NEW:
        cfg = config(loss=name)
        assert cfg.beta == loss_options(name)["beta"][1]
    assert loss_arguments(config(loss="discopop", loss_args={"tau": 0.1})) == {"beta": 0.1, "tau": 0.1}
    with pytest.raises(ConfigError, match="loss 'discopop' has no option.s. discopop_tau; valid: tau"):
        config(loss="discopop", loss_args={"discopop_tau": 0.1})


# --- through the trainer ----------------------------------------------------------------------------------------


def test_the_trainer_runs_a_list_and_a_list_of_one_is_the_loss(tiny_model_dir, tmp_path, monkeypatch):
    """[dpo] with weight 1 gives the same metrics as dpo, step by step (float64); [dpo, sft] trains, with the
    reference, and OUT/config.yaml records the list and its weights but a single loss's has no loss_weights."""
    import json

    import yaml

    from dpolab.training.loop import train
    from tests.test_train import persuasion_rows

    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in persuasion_rows()))

    def run(name, **kw):
        return train(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / name), batch_size=4, max_steps=2,
                     lr=1e-3, progress=False, save_model=False, final_checkpoint=False, dtype="float64", **kw)

    single, listed = run("single", loss="dpo"), run("listed", loss=["dpo"], loss_weights=[1.0])
    keys = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm")
    assert [[m[k] for k in keys] for m in single.metrics] == [[m[k] for k in keys] for m in listed.metrics]
    assert "loss_weights" not in yaml.safe_load((tmp_path / "single" / "config.yaml").read_text())
    mixed = run("mixed", loss=["dpo", "sft"], loss_weights=[1.0, 0.2])
    assert mixed.reference_reused is not None and all(math.isfinite(m["loss"]) for m in mixed.metrics)
    assert mixed.metrics[0]["loss"] > math.log(2)  # dpo is log 2 at the reference; the sft term adds to it
    saved = yaml.safe_load((tmp_path / "mixed" / "config.yaml").read_text())
    assert saved["loss"] == ["dpo", "sft"] and saved["loss_weights"] == [1.0, 0.2] and saved["beta"] == 0.1


def test_an_experiment_method_trains_a_weighted_list(tmp_path, tiny_model_dir):
    """A spec's method takes a list of losses, its weights among its train keys; a bad weight fails at load."""
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    raw = tiny_spec(tiny_model_dir)
    raw["methods"]["rpo"] = {"loss": ["dpo", "sft"], "train": {"loss_weights": [1.0, 0.2]}}
    raw["contexts"]["length-biased-judge"]["methods"] = ["dpo", "rpo"]
    spec = load_spec(write_spec(tmp_path, raw))
    cfg = spec.train_config("length-biased-judge", "rpo", data="-", out="-", seed=0)
    assert (cfg.loss, cfg.loss_weights, cfg.beta) == (["dpo", "sft"], [1.0, 0.2], 0.1)
    raw["methods"]["rpo"]["train"]["loss_weights"] = [1.0]
    with pytest.raises(ConfigError, match="loss_weights"):
        load_spec(write_spec(tmp_path, raw))
