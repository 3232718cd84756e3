#!/usr/bin/env bash
# The main job on the embedded default: the packaged SmolLM2-135M-Instruct pruned to 50% with
# magnitude, fine-tuned briefly with its zeros kept, perplexity measured on SOTU speeches from 2000
# on before and after, saved to out/smollm2-magnitude-50; no network needed. Extra arguments go to
# llmprune (e.g. --finetune-steps 0 to skip the fine-tune).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh offline
venv="${LLMPRUNE_VENV:-.venv}"
"$venv/bin/llmprune" packaged:smollm2 --sparsity 0.5 --output out/smollm2-magnitude-50 --overwrite \
    --eval sotu --eval-seqlen 1024 --eval-max-windows 8 \
    --finetune-steps 40 --finetune-seqlen 256 --finetune-batch-size 2 --finetune-lr 5e-4 "$@"
