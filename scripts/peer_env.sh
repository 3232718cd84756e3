#!/usr/bin/env bash
# Make .venv-peer: llm-compressor, the peer llmprune is benchmarked against, kept out of
# the project's own venv and dependencies. Idempotent: reuses the venv and skips installs
# that are already satisfied.
#
#   bash scripts/peer_env.sh
#   .venv-peer/bin/python scripts/peer_llmcompressor.py --help
#
# torch goes in first, pinned, so pip takes the CPU build from this machine's disk
# (/opt/wheels); a bare torch requirement would pull multi-GB CUDA wheels.
# llmcompressor 0.14.0.1 accepts torch>=2.10,<=2.14 and brings its own transformers
# (5.15-5.17, so 5.17.0 here); the project venv keeps its newer one.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${PEER_VENV:-.venv-peer}  # PEER_VENV: another location, e.g. to test this script
TORCH_VERSION=2.13.0
LLMCOMPRESSOR_VERSION=0.14.0.1

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

"${PIP[@]}" install "torch==$TORCH_VERSION"
# The constraint keeps torch where it is should a dependency ask for another one.
"${PIP[@]}" install "llmcompressor==$LLMCOMPRESSOR_VERSION" --constraint <(echo "torch==$TORCH_VERSION")

"$VENV/bin/python" - <<'EOF'
import llmcompressor, torch, transformers
assert torch.__version__.endswith("+cpu"), f"expected the CPU torch build, got {torch.__version__}"
print(f"llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
