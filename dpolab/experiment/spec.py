"""The experiment spec: model, contexts, methods, probes, seeds and budgets, validated at load."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from dpolab import DEFAULT_MODEL
from dpolab.config import StrictModel, TrainConfig, load_config
from dpolab.errors import ConfigError
from dpolab.models.backends import BACKEND_CHOICES
from dpolab.probes import default_probes

# Keys of TrainConfig that the runner sets for each cell; a spec can't set them.
RUNNER_KEYS = {"model", "data", "out", "seed", "progress"}


class MethodSpec(StrictModel):
    """A training method: a loss and any TrainConfig keys (lr, beta, lora, epochs, ...)."""

    loss: str = "dpo"
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig keys for this method")


class ContextEntry(StrictModel):
    """A context in a spec: the methods trained on it, its options and training keys (the context itself is a
    dpolab.contexts.base.ContextSpec in the registry)."""

    methods: list[str] = Field(default_factory=lambda: ["dpo"], description="names of methods to train on this context")
    options: dict[str, Any] = Field(default_factory=dict, description="the context's own options")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig keys for this context's cells (e.g. epochs)")


class ProbesSpec(StrictModel):
    names: list[str] = Field(default_factory=default_probes, description="probes to run (default: every default probe)")
    sizes: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-probe options, e.g. persuasion: {n_items: 40}")
    limit: int | None = Field(None, ge=1, description="cap on items per probe")
    stance: str = "auto"
    batch_size: int = Field(16, ge=1)


class Budgets(StrictModel):
    """Wall-time expectations; the runner prints each phase's time against them."""

    total_minutes: float = 30.0
    quick_minutes: float = 5.0


class ExperimentSpec(StrictModel):
    model: str = DEFAULT_MODEL
    seeds: list[int] = Field(default_factory=lambda: [0])
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig keys shared by every method")
    methods: dict[str, MethodSpec] = Field(default_factory=lambda: {"dpo": MethodSpec()})
    contexts: dict[str, ContextEntry]
    probes: ProbesSpec = Field(default_factory=ProbesSpec)
    budgets: Budgets = Field(default_factory=Budgets)
    quick: dict[str, Any] = Field(default_factory=dict, description="overrides applied with --quick (same shape as the spec)")
    n_boot: int = Field(2000, ge=100)
    backend: str = Field("auto", description="inference engine for the contexts' pairs and every eval: "
                         + ", ".join(BACKEND_CHOICES))
    int8: bool = Field(False, description="ctranslate2 with 8-bit weights (not the trained model; marked in results)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads for the whole run; default torch's choice")

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
                self.train_config(cname, mname, data="-", out="-", seed=0)  # raises on a bad key, loss or type
        return self

    def train_config(self, context: str, method: str, **runner: Any) -> TrainConfig:
        """Shared train keys, then the context's, then the method's; the runner's own keys last."""
        spec = self.methods[method]
        keys = {**self.train, **self.contexts[context].train, **spec.train}
        clash = RUNNER_KEYS & set(keys)
        if clash:
            raise ValueError(f"{context}/{method}: the runner sets {', '.join(sorted(clash))}; remove it from the spec")
        try:
            return load_config(TrainConfig, None, {**keys, "loss": spec.loss, "model": self.model, "progress": False, **runner},
                               source=f"(context {context!r}, method {method!r})")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def cells(self) -> list[tuple[str, str, int]]:
        """(context, method, seed) in run order."""
        return [(c, m, s) for c, ctx in self.contexts.items() for m in ctx.methods for s in self.seeds]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
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


def load_spec(path: str | Path | None = None, *, quick: bool = False, overrides: dict[str, Any] | None = None) -> ExperimentSpec:
    """The spec at `path` (default: the built-in default experiment), with its `quick` block applied if asked."""
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
    if quick:
        data = _merge(_declared_quick(data), data.get("quick") or {})
    data = _merge(data, overrides or {})
    return load_config(ExperimentSpec, None, data, source=str(path))
