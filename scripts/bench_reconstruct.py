"""Structured pruning of SmolLM2 with and without re-fitting the kept readout columns.

The SOTU protocol of eval/quality.md: 64 x 512 calibration tokens from speeches before 2000, 32 x
1024 evaluation windows from 2000 on, the same windows for every model. For each point: the
parameter fraction kept, and perplexity against dense.

    python scripts/bench_reconstruct.py --json eval/reconstruct.json
    python scripts/bench_reconstruct.py --points channels:0.2:wanda:re,channels:0.2:wanda:plain
    python scripts/bench_reconstruct.py --points target:0.9:wanda:re,target:0.8:wanda:re --json eval/target.json

A point is PATTERN:RATIO:METHOD:re|plain; PATTERN "target" takes RATIO as --target-params, and a mix
is written with "+" between its kinds (channels=0.2+heads=0.34:-:wanda:re).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from llmprune.config import PruneConfig
from llmprune.packaged import smollm2_checkpoint
from llmprune.perplexity import evaluate, load_windows
from llmprune.pruning import prune

DEFAULT_POINTS = ("channels:0.2:wanda:plain,channels:0.2:wanda:re,channels:0.2:sparsegpt:re,"
                  "heads:0.34:wanda:plain,heads:0.34:wanda:re,heads:0.34:sparsegpt:re")


def params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default=DEFAULT_POINTS, help="PATTERN:RATIO:METHOD:re|plain, comma-separated")
    p.add_argument("--work", default="/tmp/llmprune-reconstruct")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--json", default="eval/reconstruct.json")
    args = p.parse_args()

    dense = smollm2_checkpoint()
    windows = load_windows(str(dense), "sotu", args.eval_seqlen, args.eval_windows)
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
              "protocol": {"calibration": f"sotu {args.nsamples} x {args.seqlen}, seed 0",
                           "evaluation": f"sotu {args.eval_windows} x {args.eval_seqlen}"},
              "dense": {"params": params(dense), "perplexity": evaluate(str(dense), windows=windows, progress=False).perplexity},
              "points": []}
    print(f"dense: {report['dense']['perplexity']:.3f}", flush=True)
    for point in args.points.split(","):
        pattern, ratio, method, mode = point.split(":")
        out = Path(args.work) / point.replace(":", "-")
        shape = (dict(target_params=ratio) if pattern == "target" else
                 dict(pattern=pattern.replace("+", ",")) if "=" in pattern else dict(pattern=pattern, sparsity=float(ratio)))
        cfg = PruneConfig(model=str(dense), method=method, output=str(out), overwrite=True, calib_data="sotu",
                          nsamples=args.nsamples, seqlen=args.seqlen, reconstruct=mode == "re", **shape)
        start = time.perf_counter()
        prune(cfg, progress=False)
        seconds = time.perf_counter() - start
        ppl = evaluate(str(out), windows=windows, progress=False).perplexity
        row = {"point": point, "params": params(out), "param_fraction": params(out) / report["dense"]["params"],
               "perplexity": ppl, "ratio_to_dense": ppl / report["dense"]["perplexity"], "prune_seconds": round(seconds, 1)}
        recipe = json.loads((out / "llmprune.json").read_text())
        if "mix" in recipe.get("structured", {}):
            row["mix"] = recipe["structured"]["description"]
            row["predicted_damage"] = (recipe["structured"].get("search") or {}).get("chosen", {}).get("damage")
        report["points"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
