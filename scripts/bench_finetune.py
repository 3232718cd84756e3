"""How much of the perplexity lost to pruning a short, mask-preserving fine-tune wins back.

The packaged SmolLM2-135M (float32) is pruned to 50% (magnitude; Wanda on 64 x 512 SOTU tokens),
then each pruned model is fine-tuned whole-model and block-wise within a time budget, and every
model (dense, pruned, fine-tuned) is scored on the same evaluation windows (SOTU speeches from 2000
on; training text is the speeches before 2000). recovered = (ppl pruned - ppl fine-tuned) /
(ppl pruned - ppl dense). The masks of the fine-tuned models are compared with the pruned ones
weight by weight.

Every step is a CLI command run in its own process, one at a time (so peak memory is each run's
own), printed so that it can be rerun by hand. Prints the Markdown table and writes the JSON.

    python scripts/bench_finetune.py                        # the whole table into eval/finetune.json
    python scripts/bench_finetune.py --only magnitude --modes whole --work /tmp/ft-bench --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

PRUNE = {
    "magnitude": ["--sparsity", "0.5"],
    "wanda": ["--method", "wanda", "--sparsity", "0.5", "--nsamples", "64", "--seqlen", "512"],
    "sparsegpt-2of4": ["--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "64", "--seqlen", "512"],
    # a smaller dense model: the mix of channels, heads and layers at 80% of the dense parameters
    "target-0.8": ["--target-params", "0.8", "--nsamples", "64", "--seqlen", "512"],
}
# Sized on this project's 2-core development machine to end within 10 minutes (see eval/finetune.md).
FINETUNE = {
    "whole": ["--mode", "whole", "--steps", "80", "--seqlen", "256", "--batch-size", "2", "--lr", "5e-4"],
    "blockwise": ["--mode", "blockwise", "--steps", "32", "--nsamples", "32", "--seqlen", "512", "--batch-size", "1",
                  "--lr", "3e-4"],
}
# "distill": the whole-model fine-tune with the dense input as teacher (KL of next-token distributions)
FINETUNE["distill"] = FINETUNE["whole"] + ["--loss", "distill"]
TARGET = {"whole": 0.5, "blockwise": 1 / 3, "distill": 0.5}  # share of the pruning loss recovered
RATIO_TARGET = {"magnitude": 1.5, "wanda": 1.15, "sparsegpt-2of4": 1.5, "target-0.8": 1.25}  # ppl / dense


def run(cmd: list[str], log: list[dict]) -> float:
    """Run one CLI command (the venv's ``llmprune``), echoing it; returns its wall time."""
    print("$", shlex.join(cmd), flush=True)
    exe = Path(sys.executable).with_name("llmprune")
    start = time.perf_counter()
    subprocess.run([str(exe) if exe.is_file() else cmd[0], *cmd[1:]], check=True)
    seconds = time.perf_counter() - start
    log.append({"command": shlex.join(cmd), "seconds": round(seconds, 1)})
    return seconds


def perplexity(folder: str, out: Path, args: argparse.Namespace, log: list[dict]) -> dict:
    path = out.with_name(out.name + ".eval.json")  # not with_suffix: "target-0.8" has a dot
    if not (args.reuse and path.is_file()):
        run(["llmprune", "eval", folder, "--data", "sotu", "--seqlen", str(args.eval_seqlen), "--max-windows",
             str(args.eval_windows), "--device", "cpu", "--json", str(path), "-q"], log)
    result = json.loads(path.read_text())
    return {"perplexity": result["perplexity"], "windows": result["windows"], "seqlen": result["seqlen"]}


def same_masks(pruned: Path, tuned: Path) -> dict:
    """Whether every prunable matrix has its zeros exactly where the pruned model has them."""
    from llmprune.source import open_source

    a, b = open_source(str(pruned)), open_source(str(tuned))
    matrices = zeros = differ = 0
    try:
        for i in range(a.layout.num_layers):
            for _, name in a.layout.linear_names(i):
                x, y = a.checkpoint.read(name) == 0, b.checkpoint.read(name) == 0
                matrices += 1
                zeros += int(x.sum())
                differ += int((x != y).sum())
    finally:
        a.checkpoint.close()
        b.checkpoint.close()
    return {"matrices": matrices, "zeros": zeros, "weights_that_changed_mask": differ}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="packaged:smollm2")
    p.add_argument("--work", default="/tmp/llmprune-ft-bench", help="folder for the pruned and fine-tuned models")
    p.add_argument("--only", default="magnitude,wanda", help="pruning methods, comma-separated")
    p.add_argument("--modes", default="whole,blockwise", help="fine-tune modes, comma-separated")
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--whole", help="replace the whole-mode fine-tune options (one quoted string)")
    p.add_argument("--blockwise", help="replace the block-wise fine-tune options (one quoted string)")
    p.add_argument("--reuse", action="store_true", help="keep outputs and evaluations that already exist")
    p.add_argument("--json", default="eval/finetune.json")
    args = p.parse_args()
    for mode in FINETUNE:
        if getattr(args, mode, None):
            FINETUNE[mode] = shlex.split(getattr(args, mode))

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    dense = perplexity(args.model, work / "dense", args, log)
    rows = []
    for method in args.only.split(","):
        pruned = work / method
        if not (args.reuse and (pruned / "llmprune.json").is_file()):
            run(["llmprune", args.model, *PRUNE[method], "-o", str(pruned), "--overwrite", "-q"], log)
        before = perplexity(str(pruned), pruned, args, log)
        for mode in args.modes.split(","):
            tuned = work / f"{method}-{mode}"
            load = os.getloadavg()[0]
            if not (args.reuse and (tuned / "llmprune.json").is_file()):
                run(["llmprune", "finetune", str(pruned), "-o", str(tuned), *FINETUNE[mode], "--device", "cpu",
                     "--overwrite", "-q"], log)
            ft = json.loads((tuned / "llmprune.json").read_text())["finetune"]
            after = perplexity(str(tuned), tuned, args, log)
            gap = before["perplexity"] - dense["perplexity"]
            rows.append({
                "method": method, "mode": mode, "dense": dense["perplexity"], "pruned": before["perplexity"],
                "finetuned": after["perplexity"], "ratio_to_dense": after["perplexity"] / dense["perplexity"],
                "ratio_target": RATIO_TARGET.get(method), "recovered": (before["perplexity"] - after["perplexity"]) / gap,
                "target": TARGET[mode], "command": ft["command"], "wall_time_s": ft["wall_time_s"],
                "train_seconds": ft.get("train_seconds"), "cpu_time_s": ft.get("cpu_time_s"),
                "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2), "peak_rss_mb": ft["peak_rss_mb"],
                "tokens": ft["tokens"], "loss": {k: v for k, v in ft["loss"].items() if k != "curve"},
                "sparsity": json.loads((tuned / "llmprune.json").read_text())["sparsity"]["overall"],
                "masks": same_masks(pruned, tuned),
            })

    header = ("| pruning | fine-tune | ppl dense | ppl pruned | ppl fine-tuned | x dense (target) | recovered | target | "
              "fine-tune wall (CPU) | peak RSS | sparsity | weights that changed mask |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        met = "met" if r["recovered"] >= r["target"] else "missed"
        ratio = f"{r['ratio_to_dense']:.3f}x"
        if r["ratio_target"]:
            ratio += f" ({r['ratio_target']}x, {'met' if r['ratio_to_dense'] <= r['ratio_target'] else 'missed'})"
        lines.append(f"| {r['method']} | {r['mode']} | {r['dense']:.2f} | {r['pruned']:.2f} | {r['finetuned']:.2f} | "
                     f"{ratio} | {r['recovered']:.1%} | {r['target']:.0%} ({met}) | {r['wall_time_s']:.0f} s ({r['cpu_time_s']:.0f} s) | "
                     f"{r['peak_rss_mb']:.0f} MB | {r['sparsity']:.4%} | {r['masks']['weights_that_changed_mask']} |")
    table = "\n".join(lines)
    print(table)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "torch": torch.__version__, "python": sys.version.split()[0],
              "eval": {"data": "sotu", "seqlen": args.eval_seqlen, "windows": args.eval_windows},
              "dense": dense, "rows": rows, "commands": log, "table": table}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
