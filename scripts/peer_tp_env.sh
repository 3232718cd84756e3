#!/usr/bin/env bash
# Make .venv-peer-tp: torch-pruning, the peer for structured (width) pruning, kept out of the
# project's own venv and dependencies (and out of .venv-peer, whose transformers llm-compressor
# pins). Idempotent: reuses the venv and skips installs that are already satisfied.
#
#   bash scripts/peer_tp_env.sh
#   .venv-peer-tp/bin/python scripts/peer_torchpruning.py --help
#
# torch goes in first, pinned, so pip takes the CPU build from this machine's disk
# (/opt/wheels); a bare torch requirement would pull multi-GB CUDA wheels. The constraint
# keeps torch where it is should a dependency ask for another one.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${PEER_VENV:-.venv-peer-tp}  # PEER_VENV: another location (e.g. /work/main/.venv-peer-tp from a worktree)
TORCH_VERSION=2.13.0
TORCH_PRUNING_VERSION=1.6.1
TRANSFORMERS_VERSION=5.24.0

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# Invisible to git wherever it lives (as Python 3.13's venv does), whatever .gitignore says.
[ -e "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"
PIP=("$VENV/bin/python" -m pip)

"${PIP[@]}" install "torch==$TORCH_VERSION"
"${PIP[@]}" install "torch-pruning==$TORCH_PRUNING_VERSION" "transformers==$TRANSFORMERS_VERSION" \
    safetensors accelerate --constraint <(echo "torch==$TORCH_VERSION")

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, torch_pruning
assert torch.__version__.endswith("+cpu"), f"expected the CPU torch build, got {torch.__version__}"
print(f"torch-pruning {md.version('torch-pruning')}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
