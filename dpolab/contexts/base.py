"""What a training context is (a name, typed options, a build function) and what it returns (pairs + info)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dpolab.data.schema import PreferencePair
from dpolab.errors import ConfigError
from dpolab.options import make_options

if TYPE_CHECKING:
    from dpolab.models.chat import ChatModel
    from dpolab.progress import Progress


@dataclass
class ContextData:
    """A built context.

    pairs: the preference pairs; each has a unique `id` and a `meta` with at least "context" and "kind".
    info: what the build saw and decided (reader, counts per kind, pairs skipped and why, sizes), saved beside
        the pairs as JSON.
    """

    pairs: list[PreferencePair]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ContextSpec:
    """A registered context.

    name: its registry name.
    options: a frozen keyword-only dataclass; its defaults are the default experiment's sizes.
    build: (model, *, options, seed, limit, progress) -> ContextData.
    quick: option overrides of the `quick` variant (a smoke-test size).
    needs_model: False when the pairs do not come from the model (user-data).
    file_options: option names holding file paths; the files' contents enter the cache key.
    banks: shipped asset files the context reads; their contents enter the cache key.
    generators: modules that generate the context's items in code (e.g. "dpolab.partner"); their source enters the
        cache key as a bank's contents do.
    uses_endpoint: options -> whether the pairs include replies from the ideal-reply endpoint, whose identity then
        enters the cache key (default: when the `ideal` option is "endpoint").
    """

    name: str
    options: type
    build: Callable[..., ContextData]
    quick: dict[str, Any] = field(default_factory=dict)
    needs_model: bool = True
    file_options: tuple[str, ...] = ()
    banks: tuple[str, ...] = ()
    generators: tuple[str, ...] = ()
    uses_endpoint: Callable[[Any], bool] = field(default=lambda options: getattr(options, "ideal", None) == "endpoint")

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]

    def make_options(self, overrides: dict[str, Any] | None = None, *, quick: bool = False):
        """Options with the quick variant (if asked) and then `overrides` applied; bad keys and values fail here,
        before any model runs (dpolab.options)."""
        return make_options(self.options, overrides, kind="context", name=self.name, base=self.quick if quick else None)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")


def check_min(name: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")


def cap(default: int | None, limit: int | None) -> int | None:
    """How many items a context takes: its option, capped by --limit (as EvalContext.size does for probes)."""
    if limit is None:
        return default
    return limit if default is None else min(limit, default)


def special_strings(model: ChatModel | None) -> tuple[str, ...]:
    """The tokenizer's special tokens (e.g. <|im_end|>), which must never appear inside a training text. Every
    backend keeps its tokenizer in `model.format` (dpolab.models.chat.ChatFormat); a model may also carry one as
    `model.tokenizer`."""
    tok = getattr(getattr(model, "format", None), "tokenizer", None) or getattr(model, "tokenizer", None)
    return tuple(s for s in getattr(tok, "all_special_tokens", ()) if s)


def usable(text: str, specials: tuple[str, ...]) -> bool:
    """Whether a generated reply can be a training text: not blank, and no special token inside it."""
    return bool(text.strip()) and not any(s in text for s in specials)


def run_build(spec: ContextSpec, model: ChatModel | None, *, options, seed: int, limit: int | None,
              progress: Progress | None) -> ContextData:
    if spec.needs_model and model is None:
        raise ConfigError(f"context {spec.name!r} builds its pairs from the model's own outputs and needs a model")
    return spec.build(model, options=options, seed=seed, limit=limit, progress=progress)
