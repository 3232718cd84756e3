"""Perplexity speed: llmprune's evaluation vs the plain transformers loop, side by side in one run.

The plain loop is what most pruning code does: load the model, then per window
``model(ids, labels=ids).loss`` and ppl = exp(mean loss). llmprune's whole-model mode and, with
--streamed, its layer-by-layer mode run on the very same windows. Every measurement is end to end
(model load included) and the contenders alternate within each repeat, so background load on the
machine hits them alike. Prints the perplexities (they must agree) and the time ratios: of median
wall clock, of median process CPU time, and the median of the ratios within each repeat (which
cancels load drifting between repeats). On a busy machine the CPU time of a single-threaded run
(--threads 1) is the steadiest measure of the work each one does.

    python scripts/bench_eval.py                     # packaged SmolLM2, 4 SOTU windows of 1024
    python scripts/bench_eval.py --model ./my-model --seqlen 2048 --windows 8 --repeats 3 --streamed
    python scripts/bench_eval.py --threads 1 --repeats 5   # a shared, busy CPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llmprune.perplexity import evaluate, load_windows
from llmprune.source import model_folder


def plain_loop(folder: Path, windows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> float:
    """The reference computation, as commonly written."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    losses = []
    with torch.no_grad():
        for ids in windows:
            ids = ids[None].to(device)  # (1, T)
            losses.append(model(ids, labels=ids).loss.float().item())
    return math.exp(sum(losses) / len(losses))


def timed(fn) -> tuple[float, float, float]:
    """fn's result, wall seconds and CPU seconds (all threads of this process)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    ppl = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return ppl, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="packaged:smollm2")
    p.add_argument("--data", default="sotu")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, help="llmprune's batch size (default: its own choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", help="both contenders' dtype (default: llmprune's choice for the device)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--streamed", action="store_true", help="also time the layer-by-layer mode")
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = model_folder(args.model)
    windows = load_windows(folder, args.data, args.seqlen, args.windows)
    # A first llmprune run settles the device, dtype and batch size both contenders then use.
    warm = evaluate(folder, windows=windows, stream=False, batch_size=args.batch_size, device=args.device,
                    dtype=args.dtype, progress=False)
    device, dtype = torch.device(warm.device), getattr(torch, warm.dtype)
    contenders = {
        "plain": lambda: plain_loop(folder, windows, device, dtype),
        "whole": lambda: evaluate(folder, windows=windows, stream=False, batch_size=args.batch_size,
                                  device=str(device), dtype=dtype, progress=False).perplexity,
    }
    if args.streamed:
        contenders["streamed"] = lambda: evaluate(folder, windows=windows, stream=True, batch_size=args.batch_size,
                                                  device=str(device), dtype=dtype, progress=False).perplexity
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu_times: dict[str, list[float]] = {name: [] for name in contenders}
    ppls: dict[str, float] = {}
    for repeat in range(args.repeats):
        order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
        for name in order:
            ppls[name], seconds, cpu = timed(contenders[name])
            times[name].append(seconds)
            cpu_times[name].append(cpu)
            print(f"repeat {repeat + 1}  {name:>8}  {seconds:7.2f} s wall  {cpu:7.2f} s cpu  ppl {ppls[name]:.4f}",
                  flush=True)

    median = {name: statistics.median(t) for name, t in times.items()}
    median_cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    print(f"\n{args.model}: {len(windows)} windows x {args.seqlen} tokens of {args.data}, {device}, "
          f"{warm.dtype}, llmprune batch {warm.batch_size}, {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}")
    for name in contenders:
        rel = ppls[name] / ppls["plain"] - 1
        print(f"{name:>8}  median {median[name]:7.2f} s wall  {median_cpu[name]:7.2f} s cpu  "
              f"ppl {ppls[name]:.6f}  rel. diff vs plain {rel:+.2e}")
    paired = {}
    for name in contenders:
        if name != "plain":
            # Ratios within each repeat cancel the drift of a shared machine's load between repeats.
            paired[name] = statistics.median(p / t for p, t in zip(times["plain"], times[name]))
            print(f"speed ratio plain / {name}: {median['plain'] / median[name]:.3f}x wall, "
                  f"{median_cpu['plain'] / median_cpu[name]:.3f}x cpu, median of per-repeat ratios "
                  f"{paired[name]:.3f}x (above 1: llmprune is faster)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "data": args.data, "seqlen": args.seqlen, "windows": len(windows),
            "device": str(device), "dtype": warm.dtype, "batch_size": warm.batch_size, "repeats": args.repeats,
            "seconds": times, "cpu_seconds": cpu_times, "median_s": median, "median_cpu_s": median_cpu,
            "median_paired_ratio": paired,
            "perplexity": ppls,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
