#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the default experiment on the embedded SmolLM2-135M-Instruct
# (does DPO improve or harm its behaviour, in which training context?). Extra arguments go to `dpolab run`,
# e.g. `bash scripts/main.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
dpolab run "$@"
