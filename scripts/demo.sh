#!/usr/bin/env bash
# The main job on the embedded default: the packaged SmolLM2-135M-Instruct pruned to 50% with
# magnitude, saved to out/smollm2-magnitude-50, no network needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh offline
venv="${LLMPRUNE_VENV:-.venv}"
"$venv/bin/llmprune" packaged:smollm2 --sparsity 0.5 --output out/smollm2-magnitude-50 --overwrite "$@"
