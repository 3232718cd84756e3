#!/usr/bin/env bash
# Install llmprune with its test extras into .venv and run the test suite (slow tests skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
venv="${LLMPRUNE_VENV:-.venv}"
# No test may reach the network: the Hub is never needed.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The layers of ARCHITECTURE.md: a module importing a layer above its own (or a cycle) fails here.
"$venv/bin/lint-imports"
"$venv/bin/python" -m pytest -q "$@"
