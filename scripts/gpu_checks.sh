#!/usr/bin/env bash
# The CUDA paths and GPU measurements, as one timed script for a lent GPU machine (eval/gpu.md).
#
#   scripts/gpu_checks.sh prepare       # here: .gpu/ gets SmolLM2's config and tokenizer and SOTU text
#   scripts/gpu_checks.sh run OUT       # there: every check, each under its own time limit, logs in OUT
#   SMOKE=1 scripts/gpu_checks.sh run OUT   # here: the same steps on the CPU at toy sizes (a script check)
#
# The GPU machine has torch, transformers, accelerate, safetensors and huggingface_hub but no
# datasets, bitsandbytes or gguf, and no network: the models are SmolLM2-shaped with random
# weights (real tokenizer), the text comes from .gpu/ as plain files. Random weights make the
# perplexities meaningless as quality figures; they serve to compare CPU and CUDA results.
set -uo pipefail
cd "$(dirname "$0")/.."
A=.gpu

if [ "${1:-}" = prepare ]; then
    py="${LLMPRUNE_VENV:-.venv}/bin/python"
    mkdir -p "$A"
    src="${LLMPRUNE_CACHE:-$HOME/.cache/llmprune}/SmolLM2-135M-Instruct"
    cp "$src/config.json" "$src/tokenizer.json" "$src/tokenizer_config.json" "$A/"
    "$py" - "$A" <<'EOF'
import sys
from pathlib import Path
from llmprune.data import load_texts
out = Path(sys.argv[1])
(out / "calib.txt").write_text("\n\n".join(load_texts("sotu", "calib"))[:2_000_000])
(out / "eval.txt").write_text("\n\n".join(load_texts("sotu", "eval"))[:400_000])
EOF
    du -sh "$A"
    exit 0
fi

OUT="${2:?usage: gpu_checks.sh run OUT}"
W=/tmp/gpuw
mkdir -p "$OUT" "$W"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=python3
DEV=cuda L30=30 L8=8 NS=32 LAYER=() SCALE=1
if [ -n "${SMOKE:-}" ]; then
    DEV=cpu L30=2 L8=2 NS=4 LAYER=(--small --nsamples 4 --seqlen 256) SCALE=20 py="${LLMPRUNE_VENV:-.venv}/bin/python"
fi
CLI=("$py" -m llmprune.cli)
section() { echo; echo "=== $1 ($(date +%T))"; }
# Each step has its own limit, and all of them together end by DEADLINE seconds after the start.
DEADLINE=$(( $(date +%s) + ${DEADLINE:-520} ))
limit() {
    local s=$(($1 * SCALE)) left=$((DEADLINE - $(date +%s))); shift
    if [ -z "${SMOKE:-}" ] && [ "$left" -lt "$s" ]; then s=$left; fi
    if [ "$s" -lt 10 ]; then echo "!!! skipped (out of time): $*"; return; fi
    timeout --signal=KILL "$s" "$@" || echo "!!! exit $? (limit ${s}s): $*"
}

section environment
nvidia-smi -L
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

section "build SmolLM2-shaped random models (30 layers and 8 layers, float32)"
limit 60 "$py" - "$A" "$W" "$L30" "$L8" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
assets, work = Path(sys.argv[1]), Path(sys.argv[2])
for name, layers in (("smol30", int(sys.argv[3])), ("smol8", int(sys.argv[4]))):
    config = AutoConfig.from_pretrained(assets)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(work / name)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets / f, work / name / f)
    print(name, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
EOF

want() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }
want layer && section "issue 4: one LLaMA-2-70B-shaped decoder layer, 128 x 2048 calibration tokens"
want layer && limit 150 "$py" scripts/bench_layer.py --device "$DEV" --methods wanda,sparsegpt "${LAYER[@]}" | tee "$OUT/layer70b.jsonl"

want semi && section "issue 6: 2:4 semi-structured kernels vs dense"
want semi && limit 80 "$py" scripts/bench_semistructured.py --repeats 30 | tee "$OUT/semistructured.jsonl"

section "issue 4: the same prune on CUDA and on the CPU (8 layers, 32 x 512 calibration)"
want prune && for method in wanda sparsegpt; do
    for dev in "$DEV" cpu; do
        limit 45 "${CLI[@]}" "$W/smol8" --method "$method" --sparsity 0.5 --calib-data "$A/calib.txt" --nsamples "$NS" \
            --seqlen 512 --device "$dev" -o "$W/$method-$dev" --overwrite -q
    done
done
want prune && limit 30 "$py" - "$W" <<'EOF' | tee "$OUT/cuda_vs_cpu.txt"
import sys, json
from pathlib import Path
from safetensors.torch import load_file
work = Path(sys.argv[1])
for method in ("wanda", "sparsegpt"):
    try:
        a, b = load_file(work / f"{method}-cuda/model.safetensors"), load_file(work / f"{method}-cpu/model.safetensors")
    except Exception as err:
        print(method, "missing output:", err); continue
    names = [n for n in a if ".layers." in n and a[n].dim() == 2]
    same = sum(int(((a[n] == 0) == (b[n] == 0)).sum()) for n in names)
    total = sum(a[n].numel() for n in names)
    diff = max(float((a[n] - b[n]).abs().max()) for n in names)
    sp = [json.loads((work / f"{method}-{d}/llmprune.json").read_text())["sparsity"]["overall"] for d in ("cuda", "cpu")]
    print(json.dumps({"method": method, "mask_agreement": same / total, "max_abs_weight_diff": diff,
                      "sparsity_cuda": sp[0], "sparsity_cpu": sp[1]}))
EOF

section "issue 5: fine-tune on CUDA (bf16 autocast): whole and block-wise keep the zeros"
[ -f "$W/wanda-$DEV/llmprune.json" ] || limit 45 "${CLI[@]}" "$W/smol8" --method wanda --sparsity 0.5 \
    --calib-data "$A/calib.txt" --nsamples "$NS" --seqlen 512 --device "$DEV" -o "$W/wanda-$DEV" --overwrite -q
limit 50 "${CLI[@]}" finetune "$W/wanda-$DEV" -o "$W/ft-whole" --mode whole --steps 30 --seqlen 512 --batch-size 4 \
    --data "$A/calib.txt" --device "$DEV" --eval "$A/eval.txt" --eval-seqlen 1024 --eval-max-windows 4 --overwrite
limit 50 "${CLI[@]}" finetune "$W/wanda-$DEV" -o "$W/ft-block" --mode blockwise --steps 10 --nsamples 16 --seqlen 512 \
    --data "$A/calib.txt" --device "$DEV" --overwrite
for d in ft-whole ft-block; do
    "$py" -c "import json,sys; r=json.load(open(sys.argv[1])); f=r['finetune']; print(sys.argv[1], json.dumps({k: f.get(k) for k in ('mode','precision','mask_changes','wall_time_s','peak_gpu_mb','loss')}), 'sparsity', r['sparsity']['overall'])" "$W/$d/llmprune.json" | tee -a "$OUT/finetune.txt"
done

section "issue 3: evaluation on CUDA: whole vs streamed, and speed against the plain transformers loop"
want eval && limit 30 "${CLI[@]}" eval "$W/smol30" --data "$A/eval.txt" --seqlen 1024 --max-windows 8 --device "$DEV" --no-stream --json "$OUT/eval_whole.json"
want eval && limit 30 "${CLI[@]}" eval "$W/smol30" --data "$A/eval.txt" --seqlen 1024 --max-windows 8 --device "$DEV" --stream --json "$OUT/eval_stream.json"
want eval && limit 90 "$py" scripts/bench_eval.py --model "$W/smol30" --data "$A/eval.txt" --seqlen 1024 --windows 16 --repeats 3 \
    --device "$DEV" --streamed --json "$OUT/bench_eval.json"
section done
