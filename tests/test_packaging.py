"""The set-up script installs requirements.lock and then dpolab with --no-deps, so every dependency that
pyproject.toml declares must be pinned there too, at the same version; otherwise a clean machine lacks it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_name(name)] = version
    return pins


def test_every_declared_dependency_is_pinned_in_the_lock_at_the_same_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = _lock()
    missing, different = [], []
    for requirement in declared:
        name = _name(requirement)
        if name == "torch":  # installed first by scripts/setup.sh, from its own index
            continue
        if name not in pins:
            missing.append(name)
        elif "==" in requirement and requirement.split("==", 1)[1].strip() != pins[name]:
            different.append(f"{name}: pyproject {requirement.split('==', 1)[1]} lock {pins[name]}")
    assert not missing, f"not in requirements.lock: {missing}"
    assert not different, different
