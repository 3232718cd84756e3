"""Structured pruning of SmolLM2 with and without re-fitting the kept readout columns.

The SOTU protocol of eval/quality.md: 64 x 512 calibration tokens from speeches before 2000, 32 x
1024 evaluation windows from 2000 on, the same windows for every model. For each point: the
parameter fraction kept, and perplexity against dense.

    python scripts/bench_reconstruct.py --json eval/reconstruct.json
    python scripts/bench_reconstruct.py --points channels:0.2:wanda:re,channels:0.2:wanda:plain
    python scripts/bench_reconstruct.py --points target:0.9:wanda:re,target:0.8:wanda:re --json eval/target.json

A point is PATTERN:RATIO:METHOD:re|plain; PATTERN "target" takes RATIO as --target-params, and a mix
is written with "+" between its kinds (channels=0.2+heads=0.34:-:wanda:re).

``--match 0.8,0.9,0.7`` replaces the points by ones at matched parameter counts: for each fraction
of the dense parameters, MLP channels (wanda, re-fit) at the channel count that keeps the nearest
count, and whole decoder layers at the nearest layer count. The counts are arithmetic on the
checkpoint's shapes: an MLP channel owns one row of gate and up and one column of down (3 x hidden
parameters per layer), a decoder layer owns every tensor under ``layers.<i>.``.
"""

from __future__ import annotations

import argparse
import hashlib
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


def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()})
    return out


def matched_points(dense: Path, fractions: list[float]) -> list[dict]:
    """Channel and layer points whose parameter counts are nearest ``fraction`` x dense."""
    config = json.loads((dense / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    if config.get("mlp_bias"):
        raise SystemExit("--match counts MLP channels without biases")
    sizes = shapes(dense)
    total = sum(math.prod(s) for s in sizes.values())
    per_layer = sum(math.prod(s) for n, s in sizes.items() if ".layers.0." in n)
    per_channel = 3 * hidden * layers  # one channel removed in every layer
    out = []
    for fraction in fractions:
        goal = fraction * total
        channels = round((total - goal) / per_channel)
        dropped = round((total - goal) / per_layer)
        for pattern, count, width, unit in (("channels", channels, inter, per_channel), ("layers", dropped, layers, per_layer)):
            predicted = total - count * unit
            out.append({"target": fraction, "point": f"{pattern}:{count / width!r}:wanda:re", "removed": count,
                        "of": width, "predicted_params": predicted})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default=DEFAULT_POINTS, help="PATTERN:RATIO:METHOD:re|plain, comma-separated")
    p.add_argument("--work", default="/tmp/llmprune-reconstruct")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--json", default="eval/reconstruct.json")
    p.add_argument("--match", help="fractions of the dense parameter count: matched channel and layer points")
    p.add_argument("--dense-perplexity", type=float,
                   help="the dense perplexity already measured on these windows (not re-measured)")
    p.add_argument("--same-windows", help="a torch.save'd (n, T) LongTensor the windows must equal (else stop)")
    args = p.parse_args()

    dense = smollm2_checkpoint()
    windows = load_windows(str(dense), "sotu", args.eval_seqlen, args.eval_windows)
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    if args.same_windows and not torch.equal(torch.load(args.same_windows).long(), windows):
        raise SystemExit(f"the evaluation windows differ from {args.same_windows}")
    planned = matched_points(dense, [float(f) for f in args.match.split(",")]) if args.match else []
    dense_ppl = (args.dense_perplexity if args.dense_perplexity is not None
                 else evaluate(str(dense), windows=windows, progress=False).perplexity)
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
              "protocol": {"calibration": f"sotu {args.nsamples} x {args.seqlen}, seed 0",
                           "evaluation": f"sotu {args.eval_windows} x {args.eval_seqlen}",
                           "windows_sha256_of_int64_values": digest,
                           "windows_equal_to": args.same_windows},
              "dense": {"params": params(dense), "perplexity": dense_ppl,
                        "perplexity_measured_here": args.dense_perplexity is None},
              "points": []}
    print(f"dense: {report['dense']['perplexity']:.3f}", flush=True)
    for plan in planned:
        print(json.dumps(plan), flush=True)
    points = [m["point"] for m in planned] if planned else args.points.split(",")
    for point in points:
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
        row = {**next((m for m in planned if m["point"] == point), {}),
               "point": point, "output": str(out), "params": params(out), "param_fraction": params(out) / report["dense"]["params"],
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
