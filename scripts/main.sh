#!/usr/bin/env bash
# The main job on a fresh machine: set up, then train the embedded SmolLM2-135M-Instruct with sigmoid DPO on a
# persuasion-style dataset shipped with the package, and print what moved.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-runs/main-$(date +%Y%m%d-%H%M%S)}
dpolab train --data dpolab/assets/examples/persuasion_pairs.jsonl \
  --out "$out" --loss dpo --beta 0.1 --lr 5e-6 --batch-size 8 --max-steps 16 --set save_every=8
