"""Scale by simulation: prune synthetic checkpoints with LLaMA-2-70B layer shapes through the CLI.

Builds random bf16 checkpoints with 70B decoder layers (hidden 8192, intermediate 28672, 64
heads, 8 KV heads; ~1.71 GB per layer) and a small vocabulary (512 words, so embeddings and head
are 8 MB instead of 0.5 GB each), first with 2 then with 4 decoder layers, and prunes each with
magnitude, Wanda and SparseGPT through `python -m llmprune.cli` exactly as a user would. Reports
wall time, peak RSS and (on CUDA) peak GPU memory from each run's llmprune.json; the marginal
time per layer is (T(4 layers) - T(2 layers)) / 2, so an 80-layer run takes about
T(2) + 78 x that. Peak memory must stay flat when the layers double.

Needs only torch, transformers, accelerate, safetensors and llmprune itself: the tokenizer is a
word-level one built here and the calibration text is random words written to a local file.

    python3 scripts/bench_scale.py --device cuda                       # GPU: 128 x 2048 calibration
    nice -n 19 python3 scripts/bench_scale.py --nsamples 4 --seqlen 512  # CPU: a small calibration set
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.arch import layout_of  # noqa: E402
from llmprune.checkpoint import TensorSpec  # noqa: E402
from llmprune.shards import ShardWriter  # noqa: E402

SHAPES_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
SHAPES_SMALL = dict(hidden_size=512, intermediate_size=1792, num_attention_heads=16, num_key_value_heads=2)
# Qwen3-30B-A3B's decoder layer: 128 routed experts (8 per token) of intermediate 768, 32 query and
# 4 KV heads of 128; ~0.62 G parameters (1.25 GB in bf16) per layer, 48 layers. Experts are written
# fused on disk (experts.gate_up_proj (128, 1536, 2048), experts.down_proj (128, 2048, 768)), so the
# engine reads 3-D tensors from the shards.
SHAPES_QWEN3_MOE = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
SHAPES_QWEN3_MOE_SMALL = dict(SHAPES_QWEN3_MOE, hidden_size=256, moe_intermediate_size=96, num_experts=16,
                              num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
FAMILIES = {"llama": ("llama", SHAPES_70B, SHAPES_SMALL, 80), "qwen3-moe": ("qwen3_moe", SHAPES_QWEN3_MOE,
                                                                            SHAPES_QWEN3_MOE_SMALL, 48)}
VOCAB = 512


def word(i: int) -> str:
    return f"w{i:03d}"


def build_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over VOCAB made-up words (no download, no training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{word(i): i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def build_checkpoint(folder: Path, layers: int, seqlen: int, shapes: dict, model_type: str = "llama") -> None:
    """Random bf16 weights written tensor by tensor (never a whole model in memory)."""
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, vocab_size=VOCAB, dtype="bfloat16",
                                  max_position_embeddings=max(4096, seqlen), **shapes)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    build_tokenizer(folder)
    shapes = {n: tuple(p.shape) for n, p in layout_of(config).skeleton.state_dict().items()}
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()]
    writer = ShardWriter(folder, specs, 5 * 10**9)
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        writer.write(name, t.to(torch.bfloat16))
    writer.close()


def write_text(path: Path, seqlen: int) -> None:
    rng = random.Random(0)
    path.mkdir(parents=True)
    for d in range(4):
        (path / f"doc{d}.txt").write_text(" ".join(word(rng.randrange(1, VOCAB)) for _ in range(seqlen * 3)))


def prune(src: Path, out: Path, method: str, args: argparse.Namespace, text: Path) -> dict:
    cmd = [sys.executable, "-m", "llmprune.cli", str(src), "--method", method, "--sparsity", "0.5", "-o", str(out),
           "-q", "--device", args.device, "--calib-data", str(text), "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - start
    recipe = json.loads((out / "llmprune.json").read_text())
    shutil.rmtree(out)
    return {"seconds": round(seconds, 1), "run_s": recipe["wall_time_s"], "peak_rss_gb": round(recipe["peak_rss_mb"] / 1e3, 2),
            "peak_gpu_gb": round(recipe["peak_gpu_mb"] / 1e3, 2) if "peak_gpu_mb" in recipe else None,
            "command": " ".join(["llmprune", *cmd[3:]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,4", help="decoder layer counts to compare (default 2,4)")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="/tmp/llmprune-scale", help="scratch folder (~1.7 GB per layer, twice)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--small", action="store_true", help="1/16-wide layers: a smoke run of the script itself")
    ap.add_argument("--family", default="llama", choices=sorted(FAMILIES),
                    help="llama (LLaMA-2-70B layers, default) or qwen3-moe (Qwen3-30B-A3B layers, experts fused on disk)")
    args = ap.parse_args()
    model_type, shapes, small, total_layers = FAMILIES[args.family]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    text = work / "text"
    write_text(text, args.seqlen)
    counts = [int(n) for n in args.layers.split(",")]
    rows = []
    for layers in counts:
        src = work / f"{args.family}-shapes-{layers}layers"
        t0 = time.perf_counter()
        build_checkpoint(src, layers, args.seqlen, small if args.small else shapes, model_type)
        print(f"built {src} in {time.perf_counter() - t0:.0f} s", flush=True)
        for method in args.methods.split(","):
            row = {"layers": layers, "method": method, **prune(src, work / "out", method, args, text)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        shutil.rmtree(src)
    summary = extrapolate(rows, counts, total_layers)
    for line in summary:
        print(json.dumps(line))
    report = {"machine": machine(args.device), "family": args.family, "shapes": small if args.small else shapes,
              "small": args.small, "calibration": [args.nsamples, args.seqlen], "runs": rows,
              "extrapolated": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def extrapolate(rows: list[dict], counts: list[int], total: int = 80) -> list[dict]:
    """Marginal seconds per layer between the smallest and largest run, and an estimate for the
    whole model's ``total`` layers."""
    lo, hi = min(counts), max(counts)
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        a = next(r for r in rows if r["method"] == method and r["layers"] == lo)
        b = next(r for r in rows if r["method"] == method and r["layers"] == hi)
        per_layer = (b["run_s"] - a["run_s"]) / (hi - lo)
        out.append({"method": method, "seconds_per_layer": round(per_layer, 1),
                    f"estimated_{total}_layers_h": round((a["run_s"] + (total - lo) * per_layer) / 3600, 2),
                    "peak_rss_gb": [a["peak_rss_gb"], b["peak_rss_gb"]], "peak_gpu_gb": [a["peak_gpu_gb"], b["peak_gpu_gb"]]})
    return out


def machine(device: str) -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "load_average": os.getloadavg()}
    if torch.cuda.is_available() and device != "cpu":
        info["gpu"] = torch.cuda.get_device_name()
    return info


if __name__ == "__main__":
    main()
