#!/usr/bin/env bash
# The test suite on a fresh machine: set up (with test extras), then run every test, the real-model ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q "$@"
