"""The experiment spec: model, contexts, methods, probes, seeds and budgets, validated at load."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_serializer, model_validator

from dpolab import DEFAULT_MODEL
from dpolab.config import StrictModel, TrainConfig, load_config
from dpolab.edits import DEFAULT_K, EDITS, parse_layers
from dpolab.errors import ConfigError
from dpolab.models.backends import BACKEND_CHOICES
from dpolab.probes import default_probes
from dpolab.tracking import TrackerNames

SELF_SFT_METHOD = "sft"  # the method a self-sft placebo cell trains with

# Keys of TrainConfig that the runner sets for each cell; a spec can't set them.
RUNNER_KEYS = {"model", "data", "out", "seed", "progress"}
# Where a run is also recorded (dpolab.tracking): top-level spec keys for the whole run, never a cell's train keys,
# and not part of what the run computes (its fingerprint).
TRACKING_KEYS = {"report_to", "tracking_uri"}


def cell_name(context: str, method: str, seed: int) -> str:
    """A cell's name, and its folder's under OUT/cells: "detox__dpo__s0"."""
    return f"{context}__{method}__s{seed}"


class MethodSpec(StrictModel):
    """A method: kind "train" (a loss and any TrainConfig keys: lr, beta, lora, epochs, ...), kind "edit" (a
    weight edit from dpolab.edits.EDITS with its layers and k, computed from the context's pairs; it trains
    nothing, so the spec's and the context's train keys don't apply to it), or a kind in
    dpolab.methods.METHOD_KINDS (curriculum, iterative, rl) with its own `options` beside the loss and train keys."""

    kind: str = Field("train", description="train: a loss trains the model on the pairs; edit: the weights are "
                      "edited from the pairs (dpolab.edits); or a kind in dpolab.methods.METHOD_KINDS")
    loss: str | list[str] = Field("dpo", description="a loss name, or a list trained as a weighted sum (its "
                                  "loss_weights among the train keys)")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig keys for this method")
    edit: str | None = Field(None, description="kind edit: the edit's name in dpolab.edits.EDITS")
    layers: list[int] | str | None = Field(None, description="kind edit: the layers edited, a list or a string "
                                           "like '15-29' (default: the upper half of the model's layers)")
    k: int = Field(DEFAULT_K, ge=0, description="kind edit: directions removed per layer; 0 leaves the model as it is")
    options: dict[str, Any] = Field(default_factory=dict, description="a registered kind's own options "
                                    "(dpolab.methods), e.g. rounds: 3 for kind iterative")

    @model_validator(mode="after")
    def _keys_of_its_kind(self) -> "MethodSpec":
        from dpolab.methods import METHOD_KINDS, kind_names

        given = self.model_fields_set
        if self.kind not in kind_names():
            import difflib

            close = difflib.get_close_matches(self.kind, kind_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown method kind {self.kind!r}{hint}; choose from {', '.join(kind_names())}")
        edit_keys = [key for key in ("edit", "layers", "k") if key in given]
        if self.kind != "edit" and edit_keys:
            raise ValueError(f"{', '.join(edit_keys)} belong to an edit method; add kind: edit, or remove them")
        if self.kind in ("train", "edit") and "options" in given:
            raise ValueError(f"options belong to a registered method kind ({', '.join(METHOD_KINDS.names())}); "
                             f"a {self.kind} method takes its keys in {'train' if self.kind == 'train' else 'edit, layers, k'}")
        if self.kind in METHOD_KINDS:
            try:
                METHOD_KINDS.get(self.kind).make_options(self.options)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if self.kind != "edit":
            return self
        stray = [key for key in ("loss", "train") if key in given]
        if stray:
            raise ValueError(f"an edit method trains nothing; remove {', '.join(stray)} (or make it kind: train)")
        if self.edit is None:
            raise ValueError(f"an edit method names its edit; edit: one of {', '.join(EDITS.names())}")
        try:
            EDITS.check(self.edit)
            parse_layers(self.layers)  # the syntax; the range is checked against the model when the edit runs
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_serializer(mode="wrap")
    def _only_its_kind(self, handler) -> dict[str, Any]:
        """A train method dumps as before other kinds existed (so run fingerprints stay), an edit method without
        the train keys it has no use for, a registered kind with its options."""
        data = handler(self)
        drop = {"train": ("kind", "edit", "layers", "k", "options"), "edit": ("loss", "train", "options")}.get(
            self.kind, ("edit", "layers", "k"))
        return {key: v for key, v in data.items() if key not in drop}

    def kind_options(self):
        """The options of a registered kind, as its dataclass."""
        from dpolab.methods import METHOD_KINDS

        return METHOD_KINDS.get(self.kind).make_options(self.options)


class ContextEntry(StrictModel):
    """A context in a spec: the methods trained on it, its options and training keys (the context itself is a
    dpolab.contexts.base.ContextSpec in the registry)."""

    methods: list[str] = Field(default_factory=lambda: ["dpo"], description="names of methods to train on this context")
    options: dict[str, Any] = Field(default_factory=dict, description="the context's own options")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig keys for this context's cells (e.g. epochs)")
    placebos: list[str] = Field(default_factory=list, description="placebo controls trained beside it: shuffled "
                                "(its pairs, chosen and rejected swapped at random, same methods) and self-sft "
                                "(SFT on the model's own samples for its prompts)")
    explain: dict[str, dict[str, Any]] = Field(default_factory=dict, description="behaviours `dpolab explain` takes "
                                               "apart in each of this context's cells (not its placebos): a list "
                                               "[toxicity], or {toxicity: {top_k: 30}} with dpolab.explain options")

    @field_validator("explain", mode="before")
    @classmethod
    def _explain_as_mapping(cls, value: Any) -> Any:
        from dpolab.explain.behaviours import BEHAVIOURS
        from dpolab.explain.run import ExplainOptions
        from dpolab.options import make_options

        if isinstance(value, (list, tuple)):
            value = {name: {} for name in value}
        if not isinstance(value, dict):
            raise ValueError("explain takes a list of behaviours or a mapping behaviour -> options")
        for name, options in value.items():
            try:
                BEHAVIOURS.check(name)
                make_options(ExplainOptions, options or {}, kind="explain of", name=name)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return {name: dict(options or {}) for name, options in value.items()}

    @model_serializer(mode="wrap")
    def _without_empty_explain(self, handler) -> dict[str, Any]:
        """No `explain` key when none is asked, so the fingerprints of runs from before it existed stay."""
        data = handler(self)
        if not self.explain:
            data.pop("explain", None)
        return data

    @field_validator("placebos")
    @classmethod
    def _known_placebos(cls, placebos: list[str]) -> list[str]:
        from dpolab.contexts.placebo import PLACEBOS

        for kind in placebos:
            if kind not in PLACEBOS:
                raise ValueError(f"unknown placebo {kind!r}; choose from {', '.join(PLACEBOS)}")
        return list(dict.fromkeys(placebos))


class ProbesSpec(StrictModel):
    names: list[str] = Field(default_factory=default_probes, description="probes to run (default: every default probe)")
    sizes: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-probe options, e.g. persuasion: {n_items: 40}")
    limit: int | None = Field(None, ge=1, description="cap on items per probe")
    stance: str = "auto"
    batch_size: int = Field(16, ge=1)


class Budgets(StrictModel):
    """Wall-time expectations, and the machine they hold on; the runner prints the run's time against them."""

    total_minutes: float = 30.0
    quick_minutes: float = 5.0
    cpu: str = Field("", description="the machine the budgets were measured on, e.g. 'AMD EPYC, 2 vCPUs, without AMX'")


class Resources(StrictModel):
    """What each cell asks of a Ray cluster (`dpolab run --executor ray`); the local executor ignores it."""

    cpus: float = Field(1.0, gt=0, description="CPUs per cell task; its torch threads (unless `threads` is set)")
    gpus: float = Field(0.0, ge=0, description="GPUs per cell task (fractions share a GPU)")
    retries: int = Field(1, ge=0, description="times Ray reruns a cell whose worker died (not one that raised)")


class ExperimentSpec(StrictModel):
    model: str = DEFAULT_MODEL
    seeds: list[int] = Field(default_factory=lambda: [0])
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig keys shared by every method")
    methods: dict[str, MethodSpec] = Field(default_factory=lambda: {"dpo": MethodSpec()})
    contexts: dict[str, ContextEntry]
    probes: ProbesSpec = Field(default_factory=ProbesSpec)
    budgets: Budgets = Field(default_factory=Budgets)
    quick: dict[str, Any] = Field(default_factory=dict, description="overrides applied with --quick (same shape as the spec)")
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict, description="named overrides chosen with --preset "
                                               "NAME (same shape as the spec); 'default' is the spec as written")
    n_boot: int = Field(2000, ge=100)
    backend: str = Field("auto", description="inference engine for the contexts' pairs and every eval: "
                         + ", ".join(BACKEND_CHOICES))
    int8: bool = Field(False, description="ctranslate2 with 8-bit weights (not the trained model; marked in results)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads for the whole run; default torch's choice")
    resources: Resources = Field(default_factory=Resources, description="each cell's request under --executor ray")
    report_to: TrackerNames = Field(default_factory=list, description="trackers that also record the run, a parent run "
                                 "with one nested run per cell: mlflow, tensorboard (dpolab.tracking.TRACKERS)")
    tracking_uri: str | None = Field(None, description="MLflow's store; default: $MLFLOW_TRACKING_URI, else a file "
                                     "store in OUT/mlruns")
    inspect_log: bool = Field(False, description="also write each eval (baseline and cells) as Inspect logs in its "
                              "folder's inspect/ (dpolab.probes.inspect_log); changes no result")


    @field_validator("contexts")
    @classmethod
    def _known_contexts(cls, contexts: dict[str, ContextEntry]) -> dict[str, ContextEntry]:
        from dpolab.contexts import CONTEXTS, make_options

        for name, ctx in contexts.items():
            try:
                CONTEXTS.check(name)
                make_options(name, ctx.options)
            except ConfigError as exc:
                raise ValueError(f"{name}: {exc}") from None
        if not contexts:
            raise ValueError("name at least one context")
        return contexts

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str) -> str:
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKEND_CHOICES)}")
        return backend

    @field_validator("probes")
    @classmethod
    def _known_probes(cls, probes: ProbesSpec) -> ProbesSpec:
        from dpolab.probes import PROBES

        for name in [*probes.names, *probes.sizes]:
            try:
                PROBES.check(name)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return probes

    @model_validator(mode="after")
    def _methods_resolve(self) -> "ExperimentSpec":
        for cname, ctx in self.contexts.items():
            for m in ctx.methods:
                if m not in self.methods:
                    raise ValueError(f"context {cname!r} names method {m!r}; defined methods: {', '.join(self.methods)}")
        for cname, ctx in self.contexts.items():
            for mname in ctx.methods:
                if self.edit_method(mname) is None:
                    self.train_config(cname, mname, data="-", out="-", seed=0)  # raises on a bad key, loss or type
            if "self-sft" in ctx.placebos:
                self.train_config(cname, SELF_SFT_METHOD, data="-", out="-", seed=0)
        return self

    def method_kind(self, method: str) -> str:
        """The kind of a cell's method: a self-sft placebo's "sft" trains."""
        spec = self.methods.get(method)
        return "train" if spec is None else spec.kind

    def edit_method(self, method: str) -> MethodSpec | None:
        """The method's spec when it is an edit (the runner edits instead of training), else None."""
        spec = self.methods.get(method)
        return spec if spec is not None and spec.kind == "edit" else None

    def train_config(self, context: str, method: str, **runner: Any) -> TrainConfig:
        """Shared train keys, then the context's, then the method's; the runner's own keys last.

        A placebo cell ("shuffled:detox") takes its source context's keys; a self-sft cell (method "sft") takes
        the source's first method's keys with the sft loss, so it trains for the same steps."""
        from dpolab.contexts.placebo import parse_placebo

        placebo = parse_placebo(context)
        if placebo is not None:
            context = placebo[1]
        if method == SELF_SFT_METHOD and method not in self.methods:
            first = self.methods[self.contexts[context].methods[0]]
            keys = first.train if first.kind == "train" else {}  # an edit trains nothing: the shared keys only
            spec = MethodSpec(loss="sft", train={k: v for k, v in keys.items() if k != "loss_args"})
        else:
            spec = self.methods[method]
            if spec.kind == "edit":
                raise ValueError(f"{context}/{method} is an edit method ({spec.edit}); it has no training config")
        keys = {**self.train, **self.contexts[context].train, **spec.train}
        tracking = TRACKING_KEYS & set(keys)
        if tracking:
            raise ValueError(f"{context}/{method}: {', '.join(sorted(tracking))} apply to the whole run; set them at the "
                             "top of the spec, not in train keys")
        clash = RUNNER_KEYS & set(keys)
        if clash:
            raise ValueError(f"{context}/{method}: the runner sets {', '.join(sorted(clash))}; remove it from the spec")
        try:
            return load_config(TrainConfig, None, {**keys, "loss": spec.loss, "model": self.model, "progress": False, **runner},
                               source=f"(context {context!r}, method {method!r})")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def context_options(self, source: str, reader: str) -> dict[str, Any]:
        """A real context's options as a run builds its pairs: the run's stance reader (if the context reads
        stances), then the spec's options."""
        from dpolab.contexts import CONTEXTS

        takes_stance = "stance" in CONTEXTS.get(source).option_names()
        return {**({"stance": reader} if takes_stance else {}), **self.contexts[source].options}

    def cells(self) -> list[tuple[str, str, int]]:
        """(context, method, seed) in run order: seed by seed, so a run cut short has every context's first seeds;
        within a seed, each context's methods and then its placebos ("shuffled:<context>" with the same methods,
        "self-sft:<context>" with method "sft")."""
        from dpolab.contexts.placebo import placebo_name

        out = []
        for s in self.seeds:
            for c, ctx in self.contexts.items():
                out += [(c, m, s) for m in ctx.methods]
                for kind in ctx.placebos:
                    methods = [SELF_SFT_METHOD] if kind == "self-sft" else ctx.methods
                    out += [(placebo_name(kind, c), m, s) for m in methods]
        return out

    def fingerprint(self) -> str:
        """What the run computes (the resolved spec, its probe names included) without the blocks that only choose
        sizes (`quick`, `presets`, already applied), state expectations (`budgets`) or say where cells run
        (`resources`) or where it is also recorded (`report_to`, `tracking_uri`, `inspect_log`): a run resumes after another preset
        is retuned, under either executor, with or without trackers."""
        keep = self.model_dump(mode="json", exclude={"quick", "presets", "budgets", "resources", "inspect_log",
                                                     *TRACKING_KEYS})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, dicts merged key by key; a key set to null in `over` is removed (a preset that
    drops one of the default's contexts)."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


DEFAULT_SPEC = Path(__file__).parent / "default.yaml"


def _declared_quick(data: dict[str, Any]) -> dict[str, Any]:
    """The spec with each named context's and probe's own quick sizes (declared in its file) applied."""
    from dpolab.contexts import CONTEXTS
    from dpolab.probes import PROBES

    out = dict(data)
    contexts = {}
    for name, entry in (data.get("contexts") or {}).items():
        entry = dict(entry or {})
        if name in CONTEXTS:
            entry["options"] = {**(entry.get("options") or {}), **CONTEXTS.get(name).quick}
        contexts[name] = entry
    out["contexts"] = contexts
    probes = dict(data.get("probes") or {})
    names = probes.get("names") or default_probes()
    sizes = dict(probes.get("sizes") or {})
    for name in names:
        if name in PROBES and PROBES.get(name).quick:
            sizes[name] = {**(sizes.get(name) or {}), **PROBES.get(name).quick}
    probes["sizes"] = sizes
    out["probes"] = probes
    return out


def load_spec(path: str | Path | None = None, *, quick: bool = False, preset: str | None = None,
              overrides: dict[str, Any] | None = None) -> ExperimentSpec:
    """The spec at `path` (default: the built-in default experiment), with its `quick` block or a named preset
    (its `presets: {NAME: {...}}` block) applied if asked; "default" is the spec as written."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_SPEC
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"spec file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"spec file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"spec file {path} must hold a mapping")
    if quick and preset not in (None, "default"):
        raise ConfigError(f"--quick and --preset {preset} are different sizes of the same experiment; choose one")
    if quick:  # declared quick sizes for every context, also those the quick block adds; the block's keys on top
        over = data.get("quick") or {}
        data = _merge(_declared_quick(_merge(data, over)), over)
    elif preset not in (None, "default"):
        presets = data.get("presets") or {}
        if preset not in presets:
            raise ConfigError(f"spec file {path} has no preset {preset!r}; its presets: "
                              + ", ".join(["default", *presets]))
        data = _merge(data, presets[preset] or {})
    data = _merge(data, overrides or {})
    return load_config(ExperimentSpec, None, data, source=str(path))
