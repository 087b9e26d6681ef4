"""`explain`: why training moved a behaviour, from a base and a tuned model.

1. Run the behaviour's probe on both models (the replies, their readings, and training's effect on the metric).
2. Read both models' activations on the same replies (both models' replies, teacher-forced through each).
3. Fit a linear probe on the base model's last-layer residual states; its held-out accuracy says whether there is
   a direction to decompose at all.
4. Decompose the change along the probe direction neuron by neuron (dpolab.explain.neurons), and the same for
   `n_random` random unit directions and a probe fit to shuffled labels: every figure beside its null.
5. Intervene on the base model and rerun the probe: ablate the top-k probe-aligned neurons, patch the neurons
   that carried the change with the tuned model's mean activations; each beside k random neurons, each as a
   fraction of training's own effect, with bootstrap CIs over items.

Writes OUT/explain.json, OUT/neurons.parquet, OUT/layers.parquet and OUT/null_directions.parquet; each probe run
is an "arm" in OUT/arms/<arm>/ marked DONE when complete, so a rerun with the same OUT resumes after the last arm.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpolab import stats
from dpolab.banks import stable_hash
from dpolab.errors import ConfigError
from dpolab.explain import neurons as nz
from dpolab.explain.activations import massive_dims, reply_activations
from dpolab.explain.behaviours import BEHAVIOURS, Behaviour
from dpolab.explain.interventions import Patch, ablate, by_layer, patch
from dpolab.explain.linear_probe import fit_probe, labels
from dpolab.io import atomic_write_json
from dpolab.models.load import LoadedModel

PATCH_SETS = ("TP", "TN", "AP", "AN", "any")  # a group's top-k movers, or the top-k movers of any group


@dataclass(frozen=True, kw_only=True)
class ExplainOptions:
    """n_random: random unit directions in each null. top_k: neurons ablated or patched (and random ones beside).
    patch: which neurons are patched: a group's top-k by their part of the change ("TP", ...), or "any" group's.
    probe_layer: the residual layer the probe reads (default: the last). massive_ratio: see
    dpolab.explain.activations.massive_dims. c, folds: the probe's L2 strength and grouped folds.
    sizes: the behaviour's probe options (default: the behaviour's own). seed: sampling, folds, nulls, bootstrap.
    """

    n_random: int = 200
    top_k: int = 60
    patch: tuple[str, ...] = ("TP", "any")
    probe_layer: int | None = None
    massive_ratio: float = 100.0
    c: float = 0.1
    folds: int = 5
    sizes: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    n_boot: int = 2000
    batch_size: int = 8
    stance: str = "auto"

    def __post_init__(self):
        for name in self.patch:
            if name not in PATCH_SETS:
                raise ConfigError(f"unknown patch set {name!r}; choose from {', '.join(PATCH_SETS)}")
        if self.n_random < 2:
            raise ConfigError("n_random must be at least 2 for a null interval")


def resolve_tuned(tuned: str) -> str:
    """A model name or folder as given, or a run's cell folder (its trained model in train/model)."""
    path = Path(tuned)
    if (path / "cell.json").exists():
        model = path / "train" / "model"
        if not model.exists():
            raise ConfigError(f"{tuned} is a cell without saved weights (train/model); an edit cell keeps none")
        return str(model)
    return tuned


class _Arms:
    """Probe runs of one explanation, each in OUT/arms/<name>, skipped when already DONE."""

    def __init__(self, out: Path, behaviour: Behaviour, options: ExplainOptions, say: Callable[[str], None]):
        self.out, self.behaviour, self.options, self.say = out, behaviour, options, say
        self.stance = options.stance

    def run(self, name: str, loaded, context=nullcontext) -> Path:
        from dpolab.models.backends import chat_model
        from dpolab.probes.run import run_eval

        folder = self.out / "arms" / name
        if not (folder / "DONE").exists():
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            with context():
                chat = chat_model(loaded, backend="hf")  # hooks act on the torch model; a fresh prefix cache per arm
                run_eval(chat, probes=[self.behaviour.probe], sizes={self.behaviour.probe: self._sizes()}, out=folder,
                         seed=self.options.seed, stance=self.stance, n_boot=self.options.n_boot)
            (folder / "DONE").write_text("")
            self.say(f"arm {name}: {time.perf_counter() - t0:.0f} s")
        if name == "base":  # every later arm reads stances as the base model's calibration chose
            from dpolab.probes.summary import EvalSummary

            self.stance = EvalSummary.read(folder / "summary.json").stance_reader(self.behaviour.probe) or self.stance
        return folder

    def _sizes(self) -> dict[str, Any]:
        return {**self.behaviour.sizes, **self.options.sizes}

    def records(self, name: str) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        return pq.read_table(self.out / "arms" / name / f"{self.behaviour.probe}.parquet").to_pylist()

    def items(self, name: str) -> dict[str, float]:
        from dpolab.experiment.results import per_item_values

        return per_item_values(self.out / "arms" / name).get((self.behaviour.probe, self.behaviour.metric), {})


def _interval(iv: stats.Interval) -> dict[str, Any]:
    return _clean({"value": iv.value, "ci_low": iv.ci_low, "ci_high": iv.ci_high, "n": iv.n})


def _fraction(arms: _Arms, name: str, seed: int, n_boot: int) -> dict[str, Any]:
    a, b, c = arms.items("base"), arms.items("tuned"), arms.items(name)
    ids = sorted(set(a) & set(b) & set(c))
    iv = stats.fraction_of_change([a[i] for i in ids], [b[i] for i in ids], [c[i] for i in ids],
                                  seed=stable_hash(seed, name), n_boot=n_boot)
    delta = stats.paired_bootstrap_delta([a[i] for i in ids], [c[i] for i in ids], seed=stable_hash(seed, name, "d"),
                                         n_boot=n_boot)
    fraction = _interval(iv)
    return {"fraction_of_dpo": fraction["value"], "ci_low": fraction["ci_low"], "ci_high": fraction["ci_high"],
            "effect": _interval(delta)}


def _mean_over(acts: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    return acts[keep].mean(0).numpy()  # (L, N)


def explain(base: str | LoadedModel, tuned: str | LoadedModel, behaviour: str, out: str | Path, *,
            options: ExplainOptions | None = None, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Explain `behaviour` (a name in BEHAVIOURS) between two models; writes OUT (see the module docstring) and
    returns the content of explain.json.

    base, tuned: names or folders (a run's cell folder for `tuned`), or models already loaded (a run's cell in
        memory); interventions hook the base model while they run and remove their hooks after.
    """
    from dpolab.models.load import load_model
    from dpolab.probes.run import write_parquet

    options = options or ExplainOptions()
    say = say or (lambda line: None)
    spec: Behaviour = BEHAVIOURS.get(BEHAVIOURS.check(behaviour))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tuned_path = resolve_tuned(tuned) if isinstance(tuned, str) else tuned.name
    base_m = load_model(base) if isinstance(base, str) else base
    tuned_m = load_model(tuned_path) if isinstance(tuned, str) else tuned
    base_m.model.eval()
    tuned_m.model.eval()
    arms = _Arms(out, spec, options, say)
    arms.run("base", base_m)
    arms.run("tuned", tuned_m)

    # 2. both models on the same replies
    samples = [replace(s, source=source) for source in ("base", "tuned") for s in spec.samples(arms.records(source))]
    acts_b = reply_activations(base_m.model, base_m.tokenizer, samples, batch_size=options.batch_size)
    acts_t = reply_activations(tuned_m.model, tuned_m.tokenizer, samples, batch_size=options.batch_size)
    keep = acts_b.kept()
    kept = [samples[i] for i in keep.tolist()]
    say(f"activations: {len(kept)} replies ({len(samples) - len(kept)} of one token, no pooled token, left out)")

    # 3. the probe
    n_layers = acts_b.residual.shape[1]
    layer = options.probe_layer if options.probe_layer is not None else n_layers - 1
    if not 0 <= layer < n_layers:
        raise ConfigError(f"probe_layer {layer} is outside the model's layers 0-{n_layers - 1}")
    residual = acts_b.residual[keep, layer].numpy()  # (n, d)
    massive = massive_dims(acts_b.residual[keep], ratio=options.massive_ratio)[layer].numpy()  # (d,)
    y, threshold = labels([s.outcome for s in kept])
    groups = [s.item_id for s in kept]
    fit = fit_probe(residual, y, groups, layer=layer, exclude=massive, folds=options.folds, c=options.c,
                    seed=options.seed, n_boot=options.n_boot, threshold=threshold)
    shuffled = np.random.default_rng(stable_hash(options.seed, "labels")).permutation(y)
    fit_random = fit_probe(residual, shuffled, groups, layer=layer, exclude=massive, folds=options.folds, c=options.c,
                           seed=options.seed, n_boot=options.n_boot)

    # 4. decomposition and its nulls
    w_base, w_tuned = nz.Weights.of(base_m.model), nz.Weights.of(tuned_m.model)
    m_b, m_t = _mean_over(acts_b.neurons, keep), _mean_over(acts_t.neurons, keep)
    dec = nz.decompose(m_b, m_t, w_base, w_tuned, fit.direction)
    directions = nz.random_directions(len(fit.direction), options.n_random, seed=stable_hash(options.seed, "null"),
                                      allowed=~massive)
    null = nz.null_figures(m_b, m_t, w_base, w_tuned, directions)
    band = nz.bands(dec.figures, null)
    rl = nz.decompose(m_b, m_t, w_base, w_tuned, fit_random.direction).figures

    # 5. interventions on the base model
    n_per = m_b.shape[1]
    norms = np.linalg.norm(w_base.values, axis=1)  # (L, N)
    cosine = dec.alignment / np.where(norms > 0, norms, 1.0)  # (L, N)
    k = min(options.top_k, cosine.size)
    rng = np.random.default_rng(stable_hash(options.seed, "random neurons"))
    top = np.argsort(-cosine.ravel())[:k]
    random_k = rng.choice(cosine.size, size=k, replace=False)
    arms.run("ablate-top", base_m, lambda: ablate(base_m.model, by_layer(top.tolist(), n_per)))
    arms.run("ablate-random", base_m, lambda: ablate(base_m.model, by_layer(random_k.tolist(), n_per)))
    ablation = {"k": int(k), "neurons": [[int(i // n_per), int(i % n_per)] for i in top],
                **_fraction(arms, "ablate-top", options.seed, options.n_boot),
                "random": _fraction(arms, "ablate-random", options.seed, options.n_boot)}

    sign = -1.0 if dec.figures.net < 0 else 1.0
    moved = (dec.activation_part * sign).ravel()  # > 0: with the net change

    def patches(flat: np.ndarray) -> dict[int, Patch]:
        out_p = {}
        for lay, idx in by_layer(flat.tolist(), n_per).items():
            out_p[lay] = Patch(neurons=idx, activations=torch.as_tensor(m_t[lay, idx.numpy()]),
                               values=torch.as_tensor(w_tuned.values[lay][:, idx.numpy()]))
        return out_p

    arms.run("patch-random", base_m, lambda: patch(base_m.model, patches(random_k)))
    patch_random = _fraction(arms, "patch-random", options.seed, options.n_boot)  # every patch set's control
    patching: dict[str, Any] = {}
    for name in options.patch:
        pool = np.arange(moved.size) if name == "any" else np.flatnonzero(dec.group.ravel() == nz.GROUPS.index(name))
        chosen = pool[np.argsort(-moved[pool])][:k]
        chosen = chosen[moved[chosen] > 0]  # only neurons that moved with the change
        arms.run(f"patch-{name}", base_m, lambda: patch(base_m.model, patches(chosen)))
        patching[name] = {"k": int(len(chosen)), **_fraction(arms, f"patch-{name}", options.seed, options.n_boot),
                          "random": patch_random}

    # outputs
    base_items, tuned_items = arms.items("base"), arms.items("tuned")
    ids = sorted(set(base_items) & set(tuned_items))
    dpo_effect = stats.paired_bootstrap_delta([base_items[i] for i in ids], [tuned_items[i] for i in ids],
                                              seed=stable_hash(options.seed, "dpo"), n_boot=options.n_boot)
    result = {
        "behaviour": behaviour, "probe": spec.probe, "metric": spec.metric, "positive": spec.positive,
        "base": base if isinstance(base, str) else base.name, "tuned": tuned if isinstance(tuned, str) else tuned.name,
        "tuned_weights": tuned_path,
        "replies": {"total": len(samples), "pooled": len(kept), "one_token": len(samples) - len(kept),
                    "base": sum(s.source == "base" for s in kept), "tuned": sum(s.source == "tuned" for s in kept)},
        "effect_of_training": _interval(dpo_effect),
        "probe_accuracy": {**_interval(fit.accuracy), "random_label": _interval(fit_random.accuracy),
                           "layer": layer, "positive_rate": fit.positive_rate, "threshold": fit.threshold,
                           "massive_dims_excluded": [int(i) for i in np.flatnonzero(massive)]},
        "groups": {g: {"name": nz.GROUP_NAMES[g], "share": band.shares[g].value, "null_mean": band.shares[g].null_mean,
                       "null_low": band.shares[g].null_low, "null_high": band.shares[g].null_high,
                       "z": band.shares[g].z, "random_label": rl.shares[g], "neurons": int((dec.group == i).sum())}
                   for i, g in enumerate(nz.GROUPS)},
        "direction_of_change": "down" if dec.figures.net < 0 else "up",
        "opposing": band.opposing.to_json(),
        "net": band.net.to_json(),
        "value_part": dec.figures.value_part,
        "total_shift": {**band.total_shift.to_json(), "random_label": rl.total_shift},
        "layers": [{"layer": l, "shift": b.value, "null_mean": b.null_mean, "null_low": b.null_low,
                    "null_high": b.null_high, "z": b.z} for l, b in enumerate(band.layer_shift)],
        "ablation": ablation,
        "patching": patching,
        "options": {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in asdict(options).items()},
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    result = _clean(result)
    L, N = m_b.shape
    write_parquet(out / "neurons.parquet", [
        {"layer": l, "neuron": i, "alignment": float(dec.alignment[l, i]), "alignment_tuned": float(dec.alignment_tuned[l, i]),
         "cosine": float(cosine[l, i]), "m_base": float(m_b[l, i]), "m_tuned": float(m_t[l, i]),
         "activation_part": float(dec.activation_part[l, i]), "value_part": float(dec.value_part[l, i]),
         "group": nz.GROUPS[int(dec.group[l, i])]} for l in range(L) for i in range(N)])
    write_parquet(out / "layers.parquet", result["layers"])
    write_parquet(out / "null_directions.parquet", [
        {"direction": r, "net": f.net, "opposing": f.opposing, "total_shift": f.total_shift,
         **{f"share_{g}": f.shares[g] for g in nz.GROUPS}} for r, f in enumerate(null)])
    atomic_write_json(out / "explain.json", result)
    return result


def _clean(x: Any) -> Any:
    """JSON-ready: numpy numbers as Python ones, NaN and infinities as null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
