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


def _lock(name: str = "requirements.lock") -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
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


def test_the_optional_integrations_are_pinned_in_the_extras_lock_and_agree_with_the_main_lock():
    """`scripts/setup.sh test` installs requirements-extras.lock over requirements.lock so that the tests of Ray,
    MLflow, TensorBoard, Inspect and TRL run: each extra is pinned there, and no package is pinned twice."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for key, reqs in project["optional-dependencies"].items() if key != "test" for r in reqs]
    pins, main = _lock("requirements-extras.lock"), _lock()
    assert {"trl", "ray", "mlflow-skinny", "tensorboard", "inspect-ai"} <= {_name(r) for r in extras}
    for requirement in extras:
        name = _name(requirement)
        assert pins.get(name) == requirement.split("==", 1)[1].strip(), name
    assert not set(pins) & set(main), sorted(set(pins) & set(main))
