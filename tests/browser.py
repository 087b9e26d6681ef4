"""The headless browser the report tests drive: found on PATH, and never silently missing under CI.

Locally a machine without Chromium skips the browser tests. Under CI=true a missing browser fails them instead:
otherwise a set-up that could not install it would turn three real checks into three quiet skips and a green run.
scripts/setup.sh looks for the same names (and installs Chromium when it finds none).
"""
from __future__ import annotations

import os
import shutil

import pytest

# The names Chromium and Chrome are installed under by Debian (chromium), Ubuntu and Fedora (chromium-browser),
# Google's packages (google-chrome, google-chrome-stable) and some others (chrome).
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
ENV = "DPOLAB_CHROMIUM"  # an explicit browser: a path or a command name


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def find_chromium() -> str | None:
    """The browser's path: $DPOLAB_CHROMIUM when set, else the first of NAMES on PATH; None when there is none.

    A $DPOLAB_CHROMIUM that names nothing executable is an error, not a reason to look elsewhere: whoever set it
    meant that browser.
    """
    explicit = os.environ.get(ENV, "").strip()
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise FileNotFoundError(f"${ENV}={explicit!r} is not an executable file or a command on PATH")
        return found
    for name in NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    return None


def require_chromium() -> str:
    """The browser's path for a test that needs it. No browser: skip, except under CI=true, where the test fails."""
    try:
        found = find_chromium()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}; unset it or point it at Chromium", pytrace=False)
    if found is not None:
        return found
    missing = (f"no Chromium for the report browser tests: none of {', '.join(NAMES)} is on PATH "
               f"and ${ENV} is not set")
    if in_ci():
        pytest.fail(f"{missing}; under CI=true these tests must run, not skip "
                    f"(`bash scripts/setup.sh test` installs Chromium)", pytrace=False)
    pytest.skip(f"{missing} (`bash scripts/setup.sh test` installs it)")
