"""Typed options of a registered thing (a probe, a context): one frozen keyword-only dataclass per kind, validated
the same way for all: unknown keys fail listing the valid ones, values are checked against the field types.

Values may come from YAML (lists become tuples) or the command line ("evidence,logical" for a tuple, "3" for an
int, "none" for an optional).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError

from dpolab.errors import ConfigError


def _is_tuple(annotation: Any) -> bool:
    candidates = [annotation, *typing.get_args(annotation)]
    return any(typing.get_origin(c) is tuple or c is tuple for c in candidates)


def _from_text(annotation: Any, value: Any) -> Any:
    """Command-line text into what the field's type takes: "a, b" -> ["a", "b"] for tuples, "none" -> None."""
    if not isinstance(value, str):
        return value
    if value.strip().lower() in ("none", "null") and type(None) in typing.get_args(annotation):
        return None
    if _is_tuple(annotation):
        return [p.strip() for p in value.split(",") if p.strip()]
    return value


def make_options(options: type, overrides: dict[str, Any] | None, *, kind: str, name: str,
                 base: dict[str, Any] | None = None):
    """An instance of the dataclass `options` from `base` (e.g. quick sizes) and then `overrides`.

    kind, name: what the options belong to, for messages ("probe 'persuasion'").
    """
    overrides = dict(overrides or {})
    fields = [f.name for f in dataclasses.fields(options)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for {kind} {name!r}; choose from {', '.join(fields)}")
    hints = typing.get_type_hints(options)
    values = {k: _from_text(hints[k], v) for k, v in {**(base or {}), **overrides}.items()}
    try:
        return TypeAdapter(options).validate_python(values)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'options'}: "
                           f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise ConfigError(f"invalid options for {kind} {name!r}: {errors}") from None
