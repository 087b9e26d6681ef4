"""TRL's loss menu, checked against TRL: every `loss_type` of TRL's DPOTrainer (1.16) computed by TRL's own code
and by dpolab's loss of the same name, on the same log-probs, agreeing to float64 rounding.

TRL's loss lives inside `DPOTrainer._compute_loss(model, inputs)`, which runs the model and then the loss. It is
called here unbound on a stand-in trainer (the attributes the method reads: beta, loss_types, loss_weights,
label_smoothing, args.discopop_tau, ...) with a stand-in model whose "forward" returns fixed per-token log-probs,
and with the reference log-probs given precomputed (`precompute_ref_logps`), so no network, weights or
tokenizer are involved. dpolab gets the same per-token log-probs summed, and the completion lengths.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from dpolab.losses import LOSSES, SequenceLogps, compute_loss, loss_options

pytest.importorskip("trl")

from trl import DPOConfig, DPOTrainer  # noqa: E402

# TRL's loss_type -> dpolab's loss; the only rename is TRL's "sigmoid" (plain DPO).
TRL_TO_DPOLAB = {"sigmoid": "dpo", "hinge": "hinge", "ipo": "ipo", "robust": "robust", "sft": "sft",
                 "exo_pair": "exo_pair", "nca_pair": "nca_pair", "bco_pair": "bco_pair", "sppo_hard": "sppo_hard",
                 "aot": "aot", "aot_unpaired": "aot_unpaired", "apo_zero": "apo_zero", "apo_down": "apo_down",
                 "discopop": "discopop", "sigmoid_norm": "sigmoid_norm"}
NEW = ["exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
       "sigmoid_norm"]
RTOL = 1e-12


@dataclass
class Pairs:
    """Per-token policy log-probs of B pairs, (B, T) each, zero past each completion's length, and summed
    reference log-probs (B,)."""

    chosen_tokens: torch.Tensor  # (B, T)
    rejected_tokens: torch.Tensor  # (B, T)
    chosen_lens: list[int]
    rejected_lens: list[int]
    ref_chosen: torch.Tensor  # (B,)
    ref_rejected: torch.Tensor  # (B,)

    def logps(self) -> SequenceLogps:
        return SequenceLogps(
            chosen=self.chosen_tokens.sum(1), rejected=self.rejected_tokens.sum(1),
            chosen_tokens=torch.tensor(self.chosen_lens, dtype=torch.float64),
            rejected_tokens=torch.tensor(self.rejected_lens, dtype=torch.float64),
            ref_chosen=self.ref_chosen, ref_rejected=self.ref_rejected)


def make_pairs(chosen_lens: list[int], rejected_lens: list[int], *, seed: int, spread: float = 4.0) -> Pairs:
    """Per-token log-probs in [-3, -0.05]; reference = policy + offsets in [-spread, spread] per completion, so
    the log-ratios and margins take both signs and differ in rank from the raw log-prob gaps (which AOT sorts)."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(chosen_lens), max(chosen_lens + rejected_lens)

    def tokens(lens):
        values = -(0.05 + 2.95 * torch.rand(b, t, generator=g, dtype=torch.float64))  # (B, T)
        return values * (torch.arange(t)[None, :] < torch.tensor(lens)[:, None])  # (B, T) zero past the end

    chosen, rejected = tokens(chosen_lens), tokens(rejected_lens)
    offsets = spread * (2 * torch.rand(2, b, generator=g, dtype=torch.float64) - 1)  # (2, B)
    return Pairs(chosen, rejected, list(chosen_lens), list(rejected_lens),
                 ref_chosen=chosen.sum(1) + offsets[0], ref_rejected=rejected.sum(1) + offsets[1])


VARIED = make_pairs([1, 3, 5, 8, 2, 6, 4], [4, 2, 7, 1, 8, 3, 5], seed=0)
EQUAL_CHOSEN = make_pairs([5] * 6, [4, 2, 7, 1, 8, 3], seed=1)  # for TRL's sft (see test_sft_*)


def trl_loss(pairs: Pairs, loss_types: list[str], *, weights: list[float] | None = None, beta: float = 0.1,
             label_smoothing: float = 0.0, discopop_tau: float = 0.05) -> torch.Tensor:
    """TRL 1.16's DPOTrainer loss on these log-probs, run by TRL's own `_compute_loss` in float64."""
    b, t = pairs.chosen_tokens.shape
    per_token = torch.cat([pairs.chosen_tokens, pairs.rejected_tokens])  # (2B, T) batch is [chosen, rejected]
    # Sequence layout: one prompt token, then the completion; TRL shifts the mask by one (the prompt token predicts
    # the first completion token), so the shifted mask lines up with per_token.
    completion_mask = torch.zeros(2 * b, t + 1, dtype=torch.long)  # (2B, T+1)
    for row, n in enumerate(pairs.chosen_lens + pairs.rejected_lens):
        completion_mask[row, 1:1 + n] = 1

    def forward(**_):
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                               mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token, dtype=torch.bool))

    model = type("StandInModel", (), {"training": False, "__call__": lambda self, **kw: forward(**kw)})()  # eval mode
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", beta=beta, loss_types=list(loss_types),
        loss_weights=list(weights) if weights is not None else [1.0] * len(loss_types),
        label_smoothing=label_smoothing, use_weighting=False, args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * b, t + 1, dtype=torch.long), "attention_mask": torch.ones(2 * b, t + 1, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": pairs.ref_chosen, "ref_rejected_logps": pairs.ref_rejected}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # TRL makes some constants with torch.tensor(...) (exo_pair's ε)
    try:
        loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    finally:
        torch.set_default_dtype(default)
    assert loss.dtype == torch.float64
    return loss


def trl_options(options: dict) -> dict:
    """dpolab's option names -> trl_loss's keywords (discopop's tau is TRL's discopop_tau)."""
    renamed = {"tau": "discopop_tau"}
    return {renamed.get(k, k): v for k, v in options.items()}


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-15)


# --- the menu itself ------------------------------------------------------------------------------------------


def test_every_trl_loss_type_has_a_dpolab_loss():
    """The loss types TRL's own code dispatches on, read from its source, are exactly the 15 listed here, and each
    names a registered dpolab loss (registry key = TRL's name, apart from sigmoid = dpo)."""
    source = inspect.getsource(DPOTrainer._compute_loss)
    assert set(re.findall(r'loss_type == "(\w+)"', source)) == set(TRL_TO_DPOLAB)
    assert all(name in LOSSES for name in TRL_TO_DPOLAB.values())
    assert all(name in LOSSES.names() for name in NEW)


def test_defaults_are_trls():
    """beta, label_smoothing and discopop's tau default to DPOConfig's values; the one exception is exo_pair's
    label_smoothing, where TRL's 0.0 is refused by TRL itself for exo_pair (1e-3 is EXO's recommendation)."""
    trl_default = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
    for name in NEW:
        options = loss_options(name)
        assert options["beta"][1] == trl_default["beta"], name
        if "label_smoothing" in options and name != "exo_pair":
            assert options["label_smoothing"][1] == trl_default["label_smoothing"], name
    assert loss_options("discopop")["tau"][1] == trl_default["discopop_tau"]
    assert loss_options("exo_pair")["label_smoothing"][1] == 1e-3 and trl_default["label_smoothing"] == 0.0


def test_the_test_pairs_cover_both_signs_and_differ_in_rank():
    lp = VARIED.logps()
    margin = (lp.chosen - lp.ref_chosen) - (lp.rejected - lp.ref_rejected)
    assert (margin > 0).any() and (margin < 0).any()
    assert ((lp.chosen - lp.ref_chosen) > 0).any() and ((lp.chosen - lp.ref_chosen) < 0).any()
    # AOT sorts: the policy gaps and the reference gaps must not already be in the same order
    assert not torch.equal((lp.chosen - lp.rejected).argsort(), (lp.ref_chosen - lp.ref_rejected).argsort())
    assert len(set(VARIED.chosen_lens)) > 1 and len(set(VARIED.rejected_lens)) > 1


# --- each loss against TRL ------------------------------------------------------------------------------------

CASES = [
    ("sigmoid", {"beta": 0.1}), ("sigmoid", {"beta": 0.7}),
    ("hinge", {"beta": 0.1}), ("hinge", {"beta": 0.6}),
    ("ipo", {"beta": 0.1}), ("ipo", {"beta": 0.5}),
    ("robust", {"beta": 0.1, "label_smoothing": 0.0}), ("robust", {"beta": 0.3, "label_smoothing": 0.2}),
    ("exo_pair", {"beta": 0.1, "label_smoothing": 1e-3}), ("exo_pair", {"beta": 0.5, "label_smoothing": 0.2}),
    ("nca_pair", {"beta": 0.1}), ("nca_pair", {"beta": 0.5}),
    ("bco_pair", {"beta": 0.1}), ("bco_pair", {"beta": 0.5}),
    ("sppo_hard", {"beta": 0.1}), ("sppo_hard", {"beta": 0.5}),
    ("aot", {"beta": 0.1, "label_smoothing": 0.0}), ("aot", {"beta": 0.4, "label_smoothing": 0.15}),
    ("aot_unpaired", {"beta": 0.1, "label_smoothing": 0.0}), ("aot_unpaired", {"beta": 0.4, "label_smoothing": 0.15}),
    ("apo_zero", {"beta": 0.1}), ("apo_zero", {"beta": 0.5}),
    ("apo_down", {"beta": 0.1}), ("apo_down", {"beta": 0.5}),
    ("discopop", {"beta": 0.1, "tau": 0.05}), ("discopop", {"beta": 0.5, "tau": 0.3}),
    ("sigmoid_norm", {"beta": 0.1}), ("sigmoid_norm", {"beta": 2.0}),
]


@pytest.mark.parametrize(("trl_name", "options"), CASES, ids=[f"{n}-{i % 2}" for i, (n, _) in enumerate(CASES)])
def test_loss_equals_trls(trl_name, options):
    ours = compute_loss(TRL_TO_DPOLAB[trl_name], VARIED.logps(), **options).losses.mean()
    assert_same(ours, trl_loss(VARIED, [trl_name], **trl_options(options)))


def test_hinge_case_has_pairs_on_both_sides_of_the_hinge():
    """The hinge comparison means something only if some pairs are past the margin (zero loss) and some not."""
    losses = compute_loss("hinge", VARIED.logps(), beta=0.6).losses
    assert (losses == 0).any() and (losses > 0).any()


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sft_equals_trls_when_the_chosen_lengths_are_equal(beta):
    ours = compute_loss("sft", EQUAL_CHOSEN.logps(), beta=beta).losses.mean()
    assert_same(ours, trl_loss(EQUAL_CHOSEN, ["sft"], beta=beta))


def test_sft_differs_from_trls_by_its_weighting_when_lengths_differ():
    """A known, documented difference: TRL's sft is one token-weighted mean over the batch's chosen tokens, −Σ log
    π(token) / Σ |y_w|; dpolab's is per pair, −log π(y_w)/|y_w|, then averaged over pairs (so each pair counts
    once, whatever its length). They agree when every chosen has the same length (above)."""
    lp = VARIED.logps()
    token_weighted = -lp.chosen.sum() / lp.chosen_tokens.sum()
    assert_same(trl_loss(VARIED, ["sft"]), token_weighted)
    ours = compute_loss("sft", lp).losses.mean()
    assert_same(ours, (-lp.chosen / lp.chosen_tokens).mean())
    assert not torch.isclose(ours, token_weighted, rtol=1e-6)


# --- weighted combinations against TRL ------------------------------------------------------------------------


def test_mpo_combination_equals_trls():
    """TRL's documented MPO example: sigmoid + bco_pair + sft with weights 0.8, 0.2, 1.0 (chosen lengths equal,
    for sft)."""
    beta = 0.3
    ours = compute_loss(["dpo", "bco_pair", "sft"], EQUAL_CHOSEN.logps(), weights=[0.8, 0.2, 1.0],
                        dpo={"beta": beta}, bco_pair={"beta": beta}, sft={"beta": beta}).losses.mean()
    assert_same(ours, trl_loss(EQUAL_CHOSEN, ["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0], beta=beta))


def test_combination_with_batch_level_and_zero_weight_equals_trls():
    """TRL shares one beta and one label_smoothing among the listed losses; dpolab passes each its own mapping."""
    beta, eps = 0.2, 0.05
    names, weights = ["ipo", "aot", "discopop", "exo_pair"], [1.0, 0.5, 0.0, 2.0]
    ours = compute_loss(names, VARIED.logps(), weights=weights, ipo={"beta": beta},
                        aot={"beta": beta, "label_smoothing": eps}, discopop={"beta": beta},
                        exo_pair={"beta": beta, "label_smoothing": eps}).losses.mean()
    assert_same(ours, trl_loss(VARIED, names, weights=weights, beta=beta, label_smoothing=eps))
