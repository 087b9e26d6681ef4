"""dpolab explain on the tiny model: the decomposition is exact, the interventions do what they claim, a planted
direction stands out of its null while a random-label probe does not, and the whole command writes explain.json."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dpolab import stats
from dpolab.explain import neurons as nz
from dpolab.explain.activations import Sample, decoder_layers, down_projections, reply_activations
from dpolab.explain.interventions import Patch, ablate, by_layer, patch
from dpolab.explain.linear_probe import ProbeError, fit_probe, labels
from tests.exact import assert_same, load_float64

USER = ({"role": "user", "content": "say something"},)


def _samples(n: int = 12) -> list[Sample]:
    words = ["alpha beta", "zz zz zzz", "hello there", "quiet words", "zzz zz zz z", "plain text here"]
    return [Sample(item_id=f"i{j}", conversation=USER, reply=words[j % len(words)] + f" {j}", outcome=float(j % 2))
            for j in range(n)]


def _perturbed(loaded, seed: int = 1, scale: float = 0.05):
    """A copy of the model with every weight moved a little: a stand-in for a trained model."""
    import copy

    other = copy.deepcopy(loaded.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


def _ids(tokenizer, text: str = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nzz top"):
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_neuron_contributions_sum_to_the_layers_mlp_output_on_the_direction(tiny_model_dir):
    loaded = load_float64(tiny_model_dir)
    acts = reply_activations(loaded.model, loaded.tokenizer, _samples(), mlp_out=True)
    d = acts.residual.shape[-1]
    w = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = w / w.norm()
    for l, proj in enumerate(down_projections(loaded.model)):
        contributions = acts.neurons[:, l] * (proj.weight.T @ w)  # (n, N): m_i (v_i . w)
        assert_same(contributions.sum(1), acts.mlp_out[:, l] @ w)


def test_the_decomposition_splits_each_layers_change_exactly(tiny_model_dir):
    loaded = load_float64(tiny_model_dir)
    tuned = _perturbed(loaded)
    samples = _samples()
    a_b = reply_activations(loaded.model, loaded.tokenizer, samples, mlp_out=True)
    a_t = reply_activations(tuned, loaded.tokenizer, samples, mlp_out=True)
    w = np.random.default_rng(0).standard_normal(a_b.residual.shape[-1])
    dec = nz.decompose(a_b.neurons.mean(0).numpy(), a_t.neurons.mean(0).numpy(), nz.Weights.of(loaded.model),
                       nz.Weights.of(tuned), w)
    u = torch.as_tensor(w / np.linalg.norm(w))
    expected = (a_t.mlp_out.mean(0) - a_b.mlp_out.mean(0)) @ u  # (L,) change of each layer's MLP output along u
    assert_same(torch.as_tensor(dec.figures.layer_shift), expected)
    assert_same(torch.as_tensor((dec.activation_part + dec.value_part).sum(1)), expected)
    assert math.isclose(sum(dec.figures.shares.values()), 1.0, rel_tol=1e-12)


def test_ablating_no_neuron_changes_nothing_and_ablating_some_zeroes_their_columns(tiny_model_dir):
    loaded = load_float64(tiny_model_dir)
    ids = _ids(loaded.tokenizer)
    with torch.no_grad():
        plain = loaded.model(input_ids=ids).logits
        with ablate(loaded.model, {}):
            none = loaded.model(input_ids=ids).logits
        with ablate(loaded.model, {0: torch.tensor([], dtype=torch.long)}):
            empty = loaded.model(input_ids=ids).logits
        assert torch.equal(plain, none) and torch.equal(plain, empty)
        chosen = {0: torch.tensor([1, 5]), 1: torch.tensor([0])}
        with ablate(loaded.model, chosen):
            ablated = loaded.model(input_ids=ids).logits
        edited = _perturbed(loaded, scale=0.0)
        for l, idx in chosen.items():
            down_projections(edited)[l].weight[:, idx] = 0.0
        assert_same(ablated, edited(input_ids=ids).logits)
        assert not torch.allclose(ablated, plain)
    assert torch.equal(loaded.model(input_ids=ids).logits.detach(), plain)  # the hooks are gone


def _mlp_io(model, ids):
    """Per layer: down_proj's input (B, T, N) and output (B, T, d)."""
    seen = {}
    handles = [p.register_forward_hook(lambda m, a, o, l=l: seen.__setitem__(l, (a[0].detach(), o.detach())))
               for l, p in enumerate(down_projections(model))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def test_patching_every_neuron_with_the_tuned_activations_gives_the_tuned_mlp_outputs(tiny_model_dir):
    loaded = load_float64(tiny_model_dir)
    tuned = _perturbed(loaded)
    ids = _ids(loaded.tokenizer)
    tuned_io = _mlp_io(tuned, ids)
    n = down_projections(loaded.model)[0].weight.shape[1]
    patches = {l: Patch(neurons=torch.arange(n), activations=tuned_io[l][0], values=p.weight.detach())
               for l, p in enumerate(down_projections(tuned))}
    with patch(loaded.model, patches):
        patched_io = _mlp_io(loaded.model, ids)
    for l in tuned_io:
        assert_same(patched_io[l][1], tuned_io[l][1])
    base_io = _mlp_io(loaded.model, ids)
    assert not torch.allclose(base_io[0][1], tuned_io[0][1])  # the check is not vacuous
    # a constant per neuron (the generation case) broadcasts over positions
    const = {0: Patch(neurons=torch.tensor([2, 3]), activations=torch.tensor([0.5, -1.0], dtype=torch.float64),
                      values=down_projections(tuned)[0].weight[:, [2, 3]].detach())}
    with patch(loaded.model, const):
        io = _mlp_io(loaded.model, ids)
    m, out = base_io[0]
    w_b, w_t = down_projections(loaded.model)[0].weight.detach(), down_projections(tuned)[0].weight.detach()
    expected = out - m[..., [2, 3]] @ w_b[:, [2, 3]].T + torch.tensor([0.5, -1.0], dtype=torch.float64) @ w_t[:, [2, 3]].T
    assert_same(io[0][1], expected)


def _planted(tiny_model_dir, alpha: float):
    """Base model, replies whose label is a planted feature (a letter z in them), the class-mean direction u of
    the base model's last layer, and a tuned model whose every value vector lost a share alpha along u."""
    loaded = load_float64(tiny_model_dir)
    rng = np.random.default_rng(0)
    plain = ["the cat sat", "a bird sang", "we ate rice", "it rained", "old books", "green hills", "calm sea",
             "red apples", "one more day", "slow river"]
    samples = []
    for j in range(60):
        text = plain[j % len(plain)] + " " + plain[rng.integers(len(plain))]
        z = j % 2 == 1
        samples.append(Sample(item_id=f"i{j // 2}", conversation=USER,
                              reply=text.replace("a", "z").replace("e", "zz") if z else text, outcome=float(z)))
    acts = reply_activations(loaded.model, loaded.tokenizer, samples)
    last = acts.residual[:, -1].numpy()
    y = np.array([s.outcome for s in samples], dtype=int)
    u = last[y == 1].mean(0) - last[y == 0].mean(0)
    u /= np.linalg.norm(u)
    tuned = _perturbed(loaded, scale=0.0)
    ut = torch.as_tensor(u)
    with torch.no_grad():
        for p in down_projections(tuned):
            p.weight -= alpha * torch.outer(ut, ut @ p.weight)  # (d, N): shrink every value vector along u
    return loaded, tuned, samples, acts, y, u


def test_a_planted_direction_is_found_and_stands_out_of_its_null_while_random_labels_do_not(tiny_model_dir):
    loaded, tuned, samples, acts, y, u = _planted(tiny_model_dir, alpha=0.5)
    groups = [s.item_id for s in samples]
    last = acts.residual[:, -1].numpy()
    fit = fit_probe(last, y, groups, layer=1, seed=0, n_boot=500)
    assert fit.accuracy.value > 0.9 and fit.accuracy.ci_low > 0.7
    assert abs(float(fit.direction @ u)) > 0.5  # the probe found the planted feature's direction
    acts_t = reply_activations(tuned, loaded.tokenizer, samples)
    m_b, m_t = acts.neurons.mean(0).numpy(), acts_t.neurons.mean(0).numpy()
    wb, wt = nz.Weights.of(loaded.model), nz.Weights.of(tuned)
    null = nz.null_figures(m_b, m_t, wb, wt, nz.random_directions(len(u), 200, seed=1))
    band = nz.bands(nz.decompose(m_b, m_t, wb, wt, fit.direction).figures, null)
    assert abs(band.total_shift.z) > 3  # measured 4.7 (d = 32: a random direction's cosine with u is ~0.18)
    shuffled = np.random.default_rng(3).permutation(y)
    fit_r = fit_probe(last, shuffled, groups, layer=1, seed=0, n_boot=500)
    assert fit_r.accuracy.ci_low < 0.5 < fit_r.accuracy.ci_high or fit_r.accuracy.value < 0.65
    band_r = nz.bands(nz.decompose(m_b, m_t, wb, wt, fit_r.direction).figures, null)
    assert abs(band_r.total_shift.z) < abs(band.total_shift.z) / 2


def test_random_directions_are_unit_and_stay_out_of_excluded_dimensions():
    allowed = np.ones(16, dtype=bool)
    allowed[[0, 7]] = False
    u = nz.random_directions(16, 30, seed=0, allowed=allowed)
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), 1.0, rtol=1e-12)
    assert np.all(u[[0, 7]] == 0)


def test_labels_keep_binary_outcomes_and_split_scores_near_the_median():
    y, t = labels([0.0, 1.0, 1.0])
    assert y.tolist() == [0, 1, 1] and t is None
    y, t = labels([0.1, 0.2, 0.3, 0.4])
    assert y.tolist() == [0, 0, 1, 1] and t == 0.2
    y, t = labels([0.0] * 6 + [0.2, 0.5, 0.7, 0.9])  # ties at the bottom: the most balanced cut
    assert t == 0.0 and y.sum() == 4


def test_a_probe_with_an_empty_class_is_refused():
    x = np.random.default_rng(0).standard_normal((20, 4))
    with pytest.raises(ProbeError, match="between the classes"):
        fit_probe(x, np.array([0] * 18 + [1] * 2), [str(i) for i in range(20)], layer=0)


def test_fraction_of_change():
    a = np.zeros(40)
    b = np.full(40, -0.2) + np.random.default_rng(0).normal(0, 0.01, 40)
    c = 0.5 * b
    iv = stats.fraction_of_change(a, b, c, seed=0)
    assert math.isclose(iv.value, 0.5, rel_tol=1e-12)
    assert iv.ci_low <= 0.5 <= iv.ci_high
    assert math.isnan(stats.fraction_of_change(a, a, c, seed=0).value)  # training moved nothing: no fraction


def test_by_layer_groups_flat_indices():
    got = by_layer([3, 10, 11, 25], 10)
    assert {k: v.tolist() for k, v in got.items()} == {0: [3], 1: [0, 1], 2: [5]}


def test_persuasion_samples_take_each_reply_of_misleading_dialogues():
    from dpolab.explain.behaviours import persuasion_samples

    transcript = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"},
                  {"role": "user", "content": "no, B"}, {"role": "assistant", "content": "hmm"},
                  {"role": "user", "content": "B!"}, {"role": "assistant", "content": "fine, B"}]
    recs = [{"item_id": "x", "direction": "neg", "correct": [True, True, False], "transcript": transcript},
            {"item_id": "y", "direction": "pos", "correct": [False, True, True], "transcript": transcript},
            {"item_id": "z", "direction": "neg", "correct": [True, True, True], "transcript": transcript}]
    got = persuasion_samples(recs)
    assert [(s.item_id, s.outcome, s.reply) for s in got] == [("x", 0.0, "hmm"), ("x", 1.0, "fine, B"),
                                                              ("z", 0.0, "hmm"), ("z", 0.0, "fine, B")]
    assert got[1].conversation[-1]["content"] == "B!" and len(got[1].conversation) == 5


def test_decoder_layers_refuses_a_model_without_llama_mlps():
    from dpolab.errors import ModelError

    with pytest.raises(ModelError, match="Llama-shaped"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.fixture
def letters_scorer(monkeypatch):
    """A toxicity scorer that varies on a random model's bytes: the share of letters in the reply."""
    from dpolab import scorers

    monkeypatch.setitem(scorers.SCORERS._entries, "letters", "tests.test_explain:letters")
    monkeypatch.setitem(scorers.SCORERS._cache, "letters",
                        lambda texts: [sum(c.isalpha() for c in t) / max(1, len(t)) for t in texts])


def test_explain_writes_every_figure_and_resumes(tiny_model_dir, tmp_path, letters_scorer):
    from typer.testing import CliRunner

    from dpolab.cli import app

    tuned_dir = tmp_path / "tuned"
    loaded = load_float64(tiny_model_dir)
    _perturbed(loaded).float().save_pretrained(tuned_dir)
    loaded.tokenizer.save_pretrained(tuned_dir)
    out = tmp_path / "explain"
    args = ["explain", "--base", str(tiny_model_dir), "--tuned", str(tuned_dir), "--probe", "toxicity", "--out", str(out),
            "--n-random", "20", "--top-k", "4", "--size", "n_prompts=10", "--size", "max_new_tokens=8",
            "--size", "scorer=letters"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    r = json.loads((out / "explain.json").read_text())
    assert set(r) >= {"probe_accuracy", "groups", "layers", "ablation", "patching", "total_shift"}
    assert {"value", "ci_low", "ci_high"} <= set(r["probe_accuracy"])
    for g in nz.GROUPS:
        assert {"share", "null_mean", "null_low", "null_high", "z"} <= set(r["groups"][g])
        assert r["groups"][g]["null_low"] <= r["groups"][g]["null_high"]
    assert math.isclose(sum(r["groups"][g]["share"] for g in nz.GROUPS), 1.0, rel_tol=1e-9)
    assert len(r["layers"]) == 2 and {"shift", "null_low", "null_high"} <= set(r["layers"][0])
    for row in [r["ablation"], *r["patching"].values()]:
        assert {"fraction_of_dpo", "ci_low", "ci_high", "random"} <= set(row)
        assert "fraction_of_dpo" in row["random"]
    assert r["ablation"]["k"] == 4
    import pyarrow.parquet as pq

    assert pq.read_table(out / "neurons.parquet").num_rows == 2 * 64
    assert pq.read_table(out / "null_directions.parquet").num_rows == 20
    assert "held-out accuracy" in first.output and "arm base" in first.output
    again = CliRunner().invoke(app, args)  # every arm is DONE: nothing is generated again, the figures are the same
    assert again.exit_code == 0 and "arm base" not in again.output
    assert json.loads((out / "explain.json").read_text())["groups"] == r["groups"]

    # the report of a run whose cell holds this explanation shows a mechanism section for it
    import shutil

    from dpolab.report.write import render_report
    from tests.test_report import make_experiment

    exp = make_experiment(tmp_path / "exp")
    target = exp / "cells" / "detox__dpo__s0" / "explain" / "toxicity"
    target.mkdir(parents=True)
    shutil.copy(out / "explain.json", target / "explain.json")
    html = render_report(exp)
    assert 'id="mechanism"' in html and 'href="#mechanism"' in html
    assert "TP↓ aligned, active, dampened" in html and "ablate the top-k probe-aligned neurons" in html
    assert 'id="mechanism"' not in render_report(make_experiment(tmp_path / "plain"))


def test_explain_refuses_an_unknown_behaviour(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from dpolab.cli import app

    res = CliRunner().invoke(app, ["explain", "--tuned", str(tiny_model_dir), "--probe", "toxic", "--out", str(tmp_path)])
    assert res.exit_code != 0
    assert "toxicity" in str(res.exception) or "toxicity" in res.output


def test_a_spec_can_explain_its_cells_and_the_report_shows_them(tmp_path, tiny_model_dir, letters_scorer, monkeypatch):
    """`explain: {toxicity: {...}}` on a context: each of its cells (not its placebo) gets CELL/explain/toxicity."""
    from dpolab.experiment import runner
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"u{i}", "prompt": f"Say something about {i}.", "chosen": f"Kind {i}.",
                                        "rejected": f"Rude words {i}!"}) + "\n" for i in range(8)))
    keys = {"n_random": 10, "top_k": 3, "patch": ["any"], "n_boot": 200,
            "sizes": {"n_prompts": 10, "k": 1, "max_new_tokens": 8, "scorer": "letters"}}
    spec = tiny_spec(tiny_model_dir, contexts={"user-data": {"options": {"path": str(data)}, "placebos": ["shuffled"],
                                                             "explain": {"toxicity": keys}}})
    spec["probes"] = {"names": ["knowledge"], "sizes": {"knowledge": {"n_items": 4, "n_chunks": 2}}}
    out = tmp_path / "run"
    runner.run_experiment(load_spec(write_spec(tmp_path, spec)), out, progress=False)
    r = json.loads((out / "cells" / "user-data__dpo__s0" / "explain" / "toxicity" / "explain.json").read_text())
    assert r["ablation"]["k"] == 3 and list(r["patching"]) == ["any"]
    assert not (out / "cells" / "shuffled:user-data__dpo__s0" / "explain").exists()
    assert 'id="mechanism"' in (out / "report.html").read_text()


@pytest.mark.parametrize("explain, message", [
    (["toxic"], "unknown behaviour to explain 'toxic'"),
    ({"toxicity": {"top_kk": 3}}, "unknown option.*top_kk.*choose from"),
    ({"toxicity": {"patch": ["XY"]}}, "unknown patch set 'XY'"),
])
def test_spec_explain_errors(tmp_path, tiny_model_dir, explain, message):
    from dpolab.errors import ConfigError
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    spec = tiny_spec(tiny_model_dir, contexts={"detox": {"explain": explain}})
    with pytest.raises(ConfigError, match=message):
        load_spec(write_spec(tmp_path, spec))


def test_specs_without_explain_keep_their_fingerprint(tmp_path, tiny_model_dir):
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    plain = load_spec(write_spec(tmp_path, tiny_spec(tiny_model_dir, contexts={"detox": {}})))
    assert "explain" not in plain.model_dump(mode="json")["contexts"]["detox"]
    asked = load_spec(write_spec(tmp_path, tiny_spec(tiny_model_dir, contexts={"detox": {"explain": ["toxicity"]}})))
    assert asked.contexts["detox"].explain == {"toxicity": {}} and asked.fingerprint() != plain.fingerprint()
