"""Issue-4 quality and speed table: llmprune's magnitude, Wanda, SparseGPT and OWL on the packaged
SmolLM2, side by side with llm-compressor's Wanda and SparseGPT on the same data.

Protocol (fixed): calibration = 64 windows x 512 tokens sampled from the SOTU calibration split
(speeches before 2000) with seed 0, the very same token ids for both tools (saved once, handed to
the peer as a .pt file); evaluation = the first 32 windows x 1024 tokens of the SOTU evaluation
split (speeches from 2000 on), perplexity as `llmprune eval` computes it, for every model alike.

Every run is a fresh process, timed whole (load, calibrate, prune, save). Runs go in an order
that puts llmprune's and llm-compressor's run of the same method and pattern back to back, so
that background load hits both alike; the ratio is printed for each pair timed in this invocation.
Outputs already in --work (and evaluations already made) are reused unless named in --rerun, so
an interrupted benchmark continues where it stopped; reused wall times keep the date they were
measured on.

    python scripts/bench_quality.py                               # everything missing, peer included
    python scripts/bench_quality.py --rerun "sparsegpt 2:4"       # both tools' run of that row again
    python scripts/bench_quality.py --no-peer                     # llmprune's rows only
    python scripts/bench_quality.py --seed 1 --only "wanda 2:4"   # another calibration draw, one row
    (the peer needs `bash scripts/peer_env.sh` first)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoTokenizer

from llmprune import data
from llmprune.packaged import smollm2_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CALIB = dict(nsamples=64, seqlen=512, seed=0)


def calib_flags(seed: int = CALIB["seed"]) -> list[str]:
    """llmprune's flags for the protocol's calibration set (drawn with ``seed``)."""
    return ["--calib-data", "sotu", "--nsamples", str(CALIB["nsamples"]), "--seqlen", str(CALIB["seqlen"]),
            "--seed", str(seed)]


CALIB_FLAGS = calib_flags()
EVAL_SEQLEN = 1024
ROWS = [  # (label, tool, method, pattern, sparsity, extra flags), in running order
    ("magnitude 50%", "llmprune", "magnitude", "unstructured", 0.5, []),
    ("wanda 50%", "llmprune", "wanda", "unstructured", 0.5, []),
    ("wanda 50%", "llmcompressor", "wanda", "unstructured", 0.5, []),
    ("sparsegpt 50%", "llmprune", "sparsegpt", "unstructured", 0.5, []),
    ("sparsegpt 50%", "llmcompressor", "sparsegpt", "unstructured", 0.5, []),
    ("magnitude 2:4", "llmprune", "magnitude", "2:4", None, []),
    ("wanda 2:4", "llmprune", "wanda", "2:4", None, []),
    ("wanda 2:4", "llmcompressor", "wanda", "2:4", None, []),
    ("wanda 70% uniform", "llmprune", "wanda", "unstructured", 0.7, []),
    ("wanda 70% owl", "llmprune", "wanda", "unstructured", 0.7, ["--ratios", "owl"]),
    ("sparsegpt 2:4", "llmprune", "sparsegpt", "2:4", None, []),
    ("sparsegpt 2:4", "llmcompressor", "sparsegpt", "2:4", None, []),  # the peer's longest run
    # the ADMM weight update against SparseGPT at 50-70% and 2:4 (criteria/admm.py, its default options)
    ("admm 50%", "llmprune", "admm", "unstructured", 0.5, []),
    ("admm 2:4", "llmprune", "admm", "2:4", None, []),
    ("sparsegpt 60%", "llmprune", "sparsegpt", "unstructured", 0.6, []),
    ("sparsegpt 60%", "llmcompressor", "sparsegpt", "unstructured", 0.6, []),
    ("admm 60%", "llmprune", "admm", "unstructured", 0.6, []),
    ("sparsegpt 70%", "llmprune", "sparsegpt", "unstructured", 0.7, []),
    ("sparsegpt 70%", "llmcompressor", "sparsegpt", "unstructured", 0.7, []),
    ("admm 70%", "llmprune", "admm", "unstructured", 0.7, []),
]


def folder_name(label: str, tool: str) -> str:
    return f"{tool}-" + label.replace(" ", "-").replace("%", "").replace(":", "of")


def prune_command(label: str, tool: str, method: str, pattern: str, sparsity: float | None, extra: list[str],
                  out: Path, calib: Path, model: Path, seed: int = CALIB["seed"]) -> list[str]:
    if tool == "llmcompressor":
        return [str(ROOT / ".venv-peer" / "bin" / "python"), str(ROOT / "scripts" / "peer_llmcompressor.py"),
                "--model", str(model), "--method", method, "--pattern", pattern,
                "--sparsity", str(0.5 if sparsity is None else sparsity),
                "--calib", str(calib), "--output", str(out)]
    cmd = [sys.executable, "-m", "llmprune.cli", "packaged:smollm2", "--method", method, "--pattern", pattern,
           *calib_flags(seed), "-o", str(out), "--overwrite", "-q", *extra]
    return cmd + (["--sparsity", str(sparsity)] if sparsity is not None else [])


def timed_run(cmd: list[str], out: Path) -> dict:
    """Run one pruning process; its wall time, load and last stdout line go to OUT.run.json."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    record = {"command": " ".join(cmd), "wall_s": round(wall, 1), "date": date.today().isoformat(),
              "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
              "last_line": (res.stdout.strip().splitlines() or [""])[-1]}
    out.with_suffix(".run.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def perplexity(folder: Path, windows: int) -> float:
    """`llmprune eval` on the fixed windows, cached beside the folder."""
    cache = folder.with_name(f"{folder.name}.eval{windows}x{EVAL_SEQLEN}.json")
    if not cache.exists():
        subprocess.run([sys.executable, "-m", "llmprune.cli", "eval", str(folder), "--data", "sotu", "--seqlen",
                        str(EVAL_SEQLEN), "--max-windows", str(windows), "--json", str(cache), "-q"], check=True)
    return json.loads(cache.read_text())["perplexity"]


def measured_sparsity(out: Path, tool: str, run: dict) -> float | None:
    if tool == "llmprune":
        return json.loads((out / "llmprune.json").read_text())["sparsity"]["overall"]
    try:
        return json.loads(run["last_line"])["sparsity"]
    except (KeyError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/llmprune-quality")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--rerun", default="", help="labels to prune again, comma-separated (both tools)")
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor's rows")
    ap.add_argument("--json", default=None, help="default eval/quality.json (seed 0), else none")
    ap.add_argument("--seed", type=int, default=CALIB["seed"],
                    help="calibration draw (default 0, the protocol's); other seeds measure the spread")
    ap.add_argument("--only", default="", help="labels to run, comma-separated (default: every row)")
    args = ap.parse_args()
    if args.seed != CALIB["seed"] and args.work == ap.get_default("work"):
        args.work += f"-seed{args.seed}"
    if args.json is None and args.seed == CALIB["seed"] and not args.only:
        args.json = str(ROOT / "eval" / "quality.json")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rerun = {s.strip() for s in args.rerun.split(",") if s.strip()}
    model = smollm2_checkpoint()
    calib = work / "calib.pt"
    if not calib.exists():
        tok = AutoTokenizer.from_pretrained(model)
        torch.save(data.calibration_samples(tok, "sotu", CALIB["nsamples"], CALIB["seqlen"], args.seed), calib)

    rows = [{"label": "dense", "tool": "-", "perplexity": perplexity(model, args.eval_windows)}]
    print(json.dumps(rows[-1]), flush=True)
    timed_now: dict[tuple[str, str], float] = {}
    for label, tool, method, pattern, sparsity, extra in ROWS:
        if only and label not in only:
            continue
        if tool == "llmcompressor" and (args.no_peer or not (ROOT / ".venv-peer" / "bin" / "python").exists()):
            continue
        out = work / folder_name(label, tool)
        run_file = out.with_suffix(".run.json")
        if label in rerun or not run_file.exists() or not (out / "config.json").exists():
            for stale in work.glob(f"{out.name}.eval*.json"):
                stale.unlink()
            run = timed_run(prune_command(label, tool, method, pattern, sparsity, extra, out, calib, model, args.seed),
                            out)
            timed_now[(label, tool)] = run["wall_s"]
        else:
            run = json.loads(run_file.read_text())
        rows.append({"label": label, "tool": tool, "method": method, "pattern": pattern,
                     "sparsity": measured_sparsity(out, tool, run), "wall_s": run["wall_s"], "date": run["date"],
                     "load": [run.get("load_before"), run.get("load_after")], "command": run["command"],
                     "perplexity": perplexity(out, args.eval_windows)})
        print(json.dumps(rows[-1]), flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps({"eval_windows": args.eval_windows, "eval_seqlen": EVAL_SEQLEN,
                                               "calibration": {**CALIB, "seed": args.seed}, "rows": rows},
                                              indent=2) + "\n")
    print(table(rows, args.eval_windows))
    for (label, tool), wall in timed_now.items():
        if tool == "llmprune" and (label, "llmcompressor") in timed_now:
            peer = timed_now[(label, "llmcompressor")]
            print(f"side by side, {label}: llmprune {wall:.1f} s, llm-compressor {peer:.1f} s, "
                  f"ratio {peer / wall:.2f}x (above 1: llmprune is faster)")


def table(rows: list[dict], windows: int) -> str:
    lines = [f"| run | tool | sparsity | perplexity ({windows} x {EVAL_SEQLEN}) | wall s (whole process) | measured |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        sp = f"{r['sparsity']:.4f}" if r.get("sparsity") is not None else ""
        lines.append(f"| {r['label']} | {r['tool']} | {sp} | {r['perplexity']:.3f} | {r.get('wall_s', '')} | "
                     f"{r.get('date', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
