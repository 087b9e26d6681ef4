"""Weight edits (dpolab.edits): the ProFS maths on synthetic embeddings, the edit on the tiny model in float64, the
spec's edit methods and an edit cell through the runner."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from dpolab.data.schema import PreferencePair
from dpolab.edits import EDITS, parse_layers
from dpolab.edits.profs import (apply_edit, centred_differences, project_out, random_subspace, toxic_subspace)
from dpolab.errors import ConfigError, DataError


def orthonormal(k: int, d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T  # (k, d)


def planted(n: int = 40, d: int = 24, *, noise: float = 1e-3, seed: int = 0):
    """Chosen embeddings around a large shared mean; rejected = chosen + a_i v + noise, v orthogonal to the mean."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64) * 5  # the corpus-mean direction every reply shares
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v = v - (v @ mean) / (mean @ mean) * mean
    v = v / v.norm()
    chosen = mean + torch.randn(n, d, generator=g, dtype=torch.float64)  # (n, d)
    a = 2 + 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)  # (n, 1)
    rejected = chosen + a * v + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return chosen, rejected, v


# --- the maths on synthetic embeddings ------------------------------------------------------------------------------

def test_a_planted_difference_direction_is_recovered():
    chosen, rejected, v = planted()
    allowed = torch.ones(chosen.shape[1], dtype=torch.bool)
    sub = toxic_subspace(chosen, rejected, 1, allowed)
    assert sub.basis.shape == (1, chosen.shape[1])
    # mu carries a little of v (the rejected replies' mean shift), so the recovered direction is v less that part
    assert abs(float(sub.basis[0] @ v)) > 0.99
    assert sub.explained > 0.99  # the differences are one direction plus tiny noise
    assert torch.all(sub.singular_values[:-1] >= sub.singular_values[1:])


def test_centring_removes_the_mean_direction():
    chosen, rejected, _ = planted()
    allowed = torch.ones(chosen.shape[1], dtype=torch.bool)
    centred = centred_differences(chosen, rejected, allowed)  # (n, d)
    mu = torch.cat([chosen, rejected]).mean(0)
    assert (centred @ mu).abs().max() < 1e-10 * mu.norm() * centred.norm()
    basis = toxic_subspace(chosen, rejected, 5, allowed).basis
    assert (basis @ mu).abs().max() < 1e-10 * mu.norm()


def test_swapping_chosen_and_rejected_finds_the_same_subspace():
    """A shuffled placebo flips the sign of some differences; the projector U^T U does not move."""
    chosen, rejected, _ = planted(noise=0.3)
    allowed = torch.ones(chosen.shape[1], dtype=torch.bool)
    swap = torch.arange(len(chosen)) % 3 == 0
    c2 = torch.where(swap[:, None], rejected, chosen)
    r2 = torch.where(swap[:, None], chosen, rejected)
    a, b = toxic_subspace(chosen, rejected, 4, allowed).basis, toxic_subspace(c2, r2, 4, allowed).basis
    assert torch.allclose(a.T @ a, b.T @ b, atol=1e-10)


def test_massive_dims_are_excluded():
    from dpolab.explain.activations import massive_dims

    chosen, rejected, v = planted(d=24)
    huge, n = 7, len(chosen)
    g = torch.Generator().manual_seed(1)
    chosen[:, huge] = 3e4 * torch.randn(n, generator=g, dtype=torch.float64).sign()  # |value| 10^3 x the others
    rejected[:, huge] = 3e4 * torch.randn(n, generator=g, dtype=torch.float64).sign()
    every = torch.ones(24, dtype=torch.bool)
    # left in, the massive dimension dominates the mean and the differences: the top direction is not the planted one
    assert abs(float(toxic_subspace(chosen, rejected, 1, every).basis[0] @ v)) < 0.5
    residual = torch.stack([chosen, rejected], 0).flatten(0, 1)[:, None, :]  # (2n, L=1, d)
    massive = massive_dims(residual)[0]  # (d,)
    assert massive.tolist() == [i == huge for i in range(24)]
    sub = toxic_subspace(chosen, rejected, 3, ~massive)
    assert torch.all(sub.basis[:, huge] == 0)
    assert abs(float(sub.basis[0] @ v)) > 0.99  # with it out, the planted direction is found again


def test_k_is_capped_by_the_rank_and_zero_gives_no_direction():
    chosen, rejected, _ = planted(n=4, d=24)
    allowed = torch.ones(24, dtype=torch.bool)
    assert toxic_subspace(chosen, rejected, 10, allowed).basis.shape == (4, 24)  # 4 pairs: at most 4 directions
    assert toxic_subspace(chosen, rejected, 0, allowed).basis.shape == (0, 24)
    assert EDITS.get("random-subspace")(chosen, rejected, k=10, allowed=allowed, seed=0).basis.shape == (4, 24)


def test_random_subspace_is_orthonormal_inside_the_allowed_dims():
    allowed = torch.ones(40, dtype=torch.bool)
    allowed[[3, 17, 18]] = False
    basis = random_subspace(40, 6, allowed, seed=1)  # (6, 40)
    assert torch.allclose(basis @ basis.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.all(basis[:, ~allowed] == 0)
    assert torch.equal(basis, random_subspace(40, 6, allowed, seed=1))
    assert not torch.allclose(basis, random_subspace(40, 6, allowed, seed=2))
    assert random_subspace(40, 100, allowed, seed=0).shape == (37, 40)  # no more directions than allowed dims


def test_project_out_leaves_no_component_in_the_subspace():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g, dtype=torch.float64)  # (d, N)
    u = orthonormal(5, 32, seed=3)  # (k, d)
    edited = project_out(w, u)
    assert (u @ edited).abs().max() < 1e-12 * w.abs().max()
    assert torch.allclose(project_out(edited, u), edited, rtol=0, atol=1e-12)  # a projection: twice = once
    assert torch.equal(project_out(w, u[:0]), w)  # k = 0: the identity


@pytest.mark.parametrize("spec, n_layers, want", [
    (None, 30, list(range(15, 30))), (None, 2, [1]), ("15-17", 30, [15, 16, 17]), ("3,1-2,3", 30, [1, 2, 3]),
    ([4, 0], 30, [0, 4]), (None, None, None),
])
def test_layer_specs(spec, n_layers, want):
    assert parse_layers(spec, n_layers) == want


@pytest.mark.parametrize("spec, n_layers, message", [
    ("15-x", 30, "not a layer or a range"), ("9-3", 30, "backwards"), ([40], 30, r"out of range; the model's layers are 0-29"),
    ([], 30, "names no layer"), (3.5, 30, "list of ints"),
])
def test_bad_layer_specs(spec, n_layers, message):
    with pytest.raises(ConfigError, match=message):
        parse_layers(spec, n_layers)


# --- the edit on the tiny model ---------------------------------------------------------------------------------

def pairs(n: int = 6, *, one_token: int = 0) -> list[PreferencePair]:
    out = [PreferencePair(id=f"p{i}", prompt=[{"role": "user", "content": f"Tell me about thing {i}."}],
                          chosen=f"Thing {i} is quite nice, thanks.", rejected=f"Thing {i} is awful and so are you!")
           for i in range(n)]
    out += [PreferencePair(id=f"short{i}", prompt=[{"role": "user", "content": "Hi"}], chosen="Y", rejected="No way")
            for i in range(one_token)]
    return out


@pytest.fixture
def tiny64(tiny_model_dir):
    from dpolab.models.load import load_model

    return load_model(str(tiny_model_dir), dtype="float64")


def downs(model) -> list[torch.Tensor]:
    from dpolab.explain.activations import down_projections

    return [d.weight.detach().clone() for d in down_projections(model)]


def test_k0_is_the_identity(tiny64):
    before = downs(tiny64.model)
    report = apply_edit(tiny64.model, tiny64.tokenizer, pairs(), kind="profs", layers=[0, 1], k=0, measure_nll=False)
    assert all(torch.equal(a, b) for a, b in zip(before, downs(tiny64.model)))
    assert [l.rank for l in report.per_layer] == [0, 0] and all(l.weight_change == 0 for l in report.per_layer)


@pytest.mark.parametrize("kind", EDITS.names())
def test_edited_weights_have_no_component_in_the_found_subspace(tiny64, kind):
    """The edit is (I - U^T U) W_down with U recomputed here from the unedited model's embeddings."""
    from dpolab.edits.profs import layer_seed
    from dpolab.explain.activations import Sample, massive_dims, reply_activations

    original = copy.deepcopy(tiny64.model)
    before = downs(tiny64.model)
    data = pairs(8, one_token=1)
    report = apply_edit(tiny64.model, tiny64.tokenizer, data, kind=kind, layers="0-1", k=3, seed=5)
    assert report.pairs_total == 9 and report.pairs_used == 8 and report.dropped_ids == ["short0"]
    assert sum(report.pairs_dropped.values()) == 1
    assert report.nll_before is not None and report.nll_after is not None and report.heldout_tokens > 0
    samples = [Sample(p.id, tuple(p.prompt), r, 0.0) for p in data[:8] for r in (p.chosen, p.rejected)]
    res = reply_activations(original, tiny64.tokenizer, samples, neurons=False).residual  # (16, L, d)
    massive = massive_dims(res)
    after = downs(tiny64.model)
    for l in (0, 1):
        sub = EDITS.get(kind)(res[0::2, l], res[1::2, l], k=3, allowed=~massive[l], seed=layer_seed(5, l))
        assert sub.basis.shape[0] == 3 == report.per_layer[l].rank
        scale = before[l].abs().max()
        assert (sub.basis @ after[l]).abs().max() < 1e-10 * scale  # nothing left along U
        assert torch.allclose(after[l], project_out(before[l], sub.basis), rtol=0, atol=1e-12 * scale)
        assert (after[l] - before[l]).abs().max() > 1e-3 * scale  # and the edit did move the weights


def test_layers_out_of_range_and_no_usable_pair_are_refused(tiny64):
    with pytest.raises(ConfigError, match="0-1"):
        apply_edit(tiny64.model, tiny64.tokenizer, pairs(), layers=[2], k=1, measure_nll=False)
    with pytest.raises(ConfigError, match="unknown edit 'prof'.*did you mean 'profs'"):
        apply_edit(tiny64.model, tiny64.tokenizer, pairs(), kind="prof", k=1, measure_nll=False)
    with pytest.raises(DataError, match="no pair can be embedded"):
        apply_edit(tiny64.model, tiny64.tokenizer, pairs(0, one_token=2), k=1, measure_nll=False)


# --- the spec and the runner --------------------------------------------------------------------------------------

def edit_spec(model_dir, methods: dict, *, context_methods=None, placebos=()) -> dict:
    from tests.test_run import tiny_spec

    spec = tiny_spec(model_dir, contexts={"detox": {"methods": context_methods or list(methods),
                                                    "placebos": list(placebos), "options": {"n_prompts": 2, "k": 2}}})
    spec["methods"] = methods
    return spec


@pytest.mark.parametrize("method, message", [
    ({"kind": "edit", "edit": "prof"}, r"unknown edit 'prof' \(did you mean 'profs'\?\); choose from profs, random-subspace"),
    ({"kind": "edit"}, "names its edit; edit: one of profs, random-subspace"),
    ({"kind": "edit", "edit": "profs", "loss": "dpo"}, "an edit method trains nothing; remove loss"),
    ({"kind": "edit", "edit": "profs", "train": {"lr": 1e-5}}, "remove train"),
    ({"kind": "edit", "edit": "profs", "layers": "5-x"}, "not a layer or a range"),
    ({"kind": "edit", "edit": "profs", "k": -1}, "k"),
    ({"loss": "dpo", "k": 4}, "k belong to an edit method; add kind: edit"),
    ({"kind": "edits", "edit": "profs"}, "kind"),
])
def test_edit_method_spec_errors(tmp_path, tiny_model_dir, method, message):
    from dpolab.experiment.spec import load_spec
    from tests.test_run import write_spec

    with pytest.raises(ConfigError, match=message):
        load_spec(write_spec(tmp_path, edit_spec(tiny_model_dir, {"m": method})))


def test_edit_methods_in_a_spec_placebos_and_self_sft(tmp_path, tiny_model_dir):
    from dpolab.experiment.spec import load_spec
    from tests.test_run import write_spec

    methods = {"profs": {"kind": "edit", "edit": "profs", "layers": "1-1", "k": 2}, "dpo": {"loss": "dpo"}}
    spec = load_spec(write_spec(tmp_path, edit_spec(tiny_model_dir, methods, placebos=["shuffled", "self-sft"])))
    assert spec.edit_method("profs").k == 2 and spec.edit_method("dpo") is None
    assert ("shuffled:detox", "profs", 0) in spec.cells() and ("self-sft:detox", "sft", 0) in spec.cells()
    sft = spec.train_config("self-sft:detox", "sft", data="-", out="-", seed=0)  # the first method is an edit
    assert sft.loss == "sft" and sft.max_steps == 2  # the shared train keys, none of the edit's
    with pytest.raises(ValueError, match="edit method"):
        spec.train_config("detox", "profs", data="-", out="-", seed=0)
    dumped = spec.model_dump(mode="json")["methods"]
    assert dumped["dpo"] == {"loss": "dpo", "train": {}}  # a train method dumps as before (fingerprints hold)
    assert dumped["profs"] == {"kind": "edit", "edit": "profs", "layers": "1-1", "k": 2}


def test_the_detox_edit_preset():
    from dpolab.experiment.spec import load_spec

    spec = load_spec(preset="detox-edit")
    assert spec.contexts["detox"].methods == ["dpo", "profs", "random-subspace"]
    assert {m: (spec.methods[m].edit, spec.methods[m].k, spec.methods[m].layers) for m in ("profs", "random-subspace")} \
        == {"profs": ("profs", 10, None), "random-subspace": ("random-subspace", 10, None)}
    assert load_spec().contexts["detox"].methods == ["dpo"]  # the default experiment is unchanged


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_HOME", str(tmp_path / "home"))


def test_an_edit_cell_runs_end_to_end(tmp_path, tiny_model_dir, home):
    """DPO, ProFS and the random control on a user's pairs beside the shuffled placebo: edit cells train nothing,
    write edit.json, are evaluated like trained cells, and the shuffled ProFS cell finds the same subspace."""
    from dpolab.experiment import runner
    from dpolab.experiment.results import read_results
    from dpolab.experiment.spec import load_spec
    from tests.test_run import tiny_spec, write_spec

    data = tmp_path / "pairs.jsonl"
    rows = [{"id": f"u{i}", "prompt": f"Say something about {i}.", "chosen": f"Kind words {i}.",
             "rejected": f"Rude words {i}!"} for i in range(8)] + [{"id": "one", "prompt": "Hi", "chosen": "Y",
                                                                     "rejected": "No."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tiny_spec(tiny_model_dir, contexts={"user-data": {"methods": ["dpo", "profs", "random-subspace"],
                                                             "options": {"path": str(data)}, "placebos": ["shuffled"]}})
    spec["methods"] = {"dpo": {"loss": "dpo"}, "profs": {"kind": "edit", "edit": "profs", "k": 2},
                       "random-subspace": {"kind": "edit", "edit": "random-subspace", "k": 2, "layers": [0, 1]}}
    spec["probes"] = {"names": ["knowledge"], "sizes": {"knowledge": {"n_items": 4, "n_chunks": 2}}}
    out = tmp_path / "run"
    runner.run_experiment(load_spec(write_spec(tmp_path, spec)), out, progress=False)

    cells = out / "cells"
    for name in ("user-data__profs__s0", "user-data__random-subspace__s0", "shuffled:user-data__profs__s0"):
        cell = json.loads((cells / name / "cell.json").read_text())
        edit = json.loads((cells / name / "edit" / "edit.json").read_text())
        assert cell["train_steps"] == 0 and cell["edit"]["pairs_used"] == 8 == edit["pairs_used"]
        assert edit["pairs_dropped"] and edit["dropped_ids"] == ["one"]  # the one-token reply, counted
        assert not (cells / name / "train").exists() and (cells / name / "eval" / "summary.json").exists()
    assert json.loads((cells / "user-data__dpo__s0" / "cell.json").read_text())["train_steps"] > 0
    profs = json.loads((cells / "user-data__profs__s0" / "edit" / "edit.json").read_text())
    assert profs["layers"] == [1] and profs["per_layer"][0]["rank"] == 2  # default: the upper half of 2 layers
    rand = json.loads((cells / "user-data__random-subspace__s0" / "edit" / "edit.json").read_text())
    assert rand["layers"] == [0, 1]
    shuffled = json.loads((cells / "shuffled:user-data__profs__s0" / "edit" / "edit.json").read_text())
    assert shuffled["per_layer"][0]["singular_values"] == pytest.approx(profs["per_layer"][0]["singular_values"],
                                                                       rel=1e-9)
    phases = [name for name, _ in json.loads((out / "timings.json").read_text())["phases"]]
    assert "user-data__profs__s0: edit" in phases and "user-data__dpo__s0: train" in phases
    results = read_results(out / "results.parquet")
    assert {(r.context, r.method) for r in results} >= {("user-data", m) for m in ("dpo", "profs", "random-subspace")}
    assert {r.placebo for r in results if r.context == "user-data"} == {"shuffled:user-data"}
