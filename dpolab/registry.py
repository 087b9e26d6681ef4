"""Name -> "module:attr" registries with lazy import and did-you-mean errors."""
from __future__ import annotations

import difflib
import importlib
from typing import Any

from dpolab.errors import ConfigError


class RegistryError(ConfigError):
    """An unknown name was asked of a registry."""


class Registry:
    """Maps names to lazily imported objects.

    kind: what the entries are ("loss", "probe", ...), used in error messages.
    entries: name -> "package.module:attribute".
    """

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries = dict(entries)
        self._cache: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def check(self, name: str) -> str:
        """Return name if registered, else raise with the options and a close match."""
        if name in self._entries:
            return name
        close = difflib.get_close_matches(name, self._entries, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RegistryError(f"unknown {self.kind} {name!r}{hint}; choose from {', '.join(self._entries)}")

    def get(self, name: str) -> Any:
        self.check(name)
        if name not in self._cache:
            module, attr = self._entries[name].split(":")
            self._cache[name] = getattr(importlib.import_module(module), attr)
        return self._cache[name]
