"""Issue-4 quality and speed table: llmprune's magnitude, Wanda, SparseGPT and OWL on the packaged
SmolLM2, side by side with llm-compressor's Wanda and SparseGPT on the same data.

Protocol (fixed): calibration = 64 windows x 512 tokens sampled from the SOTU calibration split
(speeches before 2000) with seed 0; evaluation = the first 8 windows x 1024 tokens of the SOTU
evaluation split (a 32-window pass costs ~7 CPU-minutes per model on 2 cores) (speeches from 2000 on), perplexity as `llmprune eval` computes it. Both tools
see the very same calibration token ids (saved once, handed to the peer as a .pt file).

Every run is a fresh process, run one after another; wall time is the whole process (load,
calibrate, prune, save), and for llm-compressor also its oneshot call alone as it reports it.

    python scripts/bench_quality.py [--work /tmp/llmprune-quality] [--no-peer]
    (the peer needs `bash scripts/peer_env.sh` first)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from llmprune import data
from llmprune.packaged import smollm2_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CALIB = dict(nsamples=64, seqlen=512, seed=0)
EVAL = dict(seqlen=1024, windows=8)
RUNS = [  # (label, method, pattern, sparsity, extra flags)
    ("magnitude 50%", "magnitude", "unstructured", 0.5, []),
    ("wanda 50%", "wanda", "unstructured", 0.5, []),
    ("sparsegpt 50%", "sparsegpt", "unstructured", 0.5, []),
    ("magnitude 2:4", "magnitude", "2:4", None, []),
    ("wanda 2:4", "wanda", "2:4", None, []),
    ("sparsegpt 2:4", "sparsegpt", "2:4", None, []),
    ("wanda 70% uniform", "wanda", "unstructured", 0.7, []),
    ("wanda 70% owl", "wanda", "unstructured", 0.7, ["--ratios", "owl"]),
]
PEER = [("wanda", "unstructured"), ("sparsegpt", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "2:4")]


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return wall, res.stdout


def perplexity(folder: Path, work: Path) -> float:
    out = work / f"{folder.name}.eval.json"
    subprocess.run([sys.executable, "-m", "llmprune.cli", "eval", str(folder), "--data", "sotu", "--seqlen",
                    str(EVAL["seqlen"]), "--max-windows", str(EVAL["windows"]), "--json", str(out), "-q"], check=True)
    return json.loads(out.read_text())["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/llmprune-quality")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--ours", action="store_true", help="only llmprune's runs (write eval/quality-llmprune.json)")
    ap.add_argument("--peer-dir", help="evaluate llm-compressor outputs already made in DIR/<method>-<pattern> "
                                       "(with DIR/<method>-<pattern>.log ending in the peer's JSON line) instead of rerunning")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = smollm2_checkpoint()
    rows = []
    if args.peer_dir:
        rows = json.loads((ROOT / "eval" / "quality-llmprune.json").read_text())
        for method, pattern in PEER:
            out = Path(args.peer_dir) / f"{method}-{pattern.replace(':', 'of')}"
            log = out.with_suffix(".log")
            if not (out / "model.safetensors").exists() or not log.exists():
                print(f"skipping {out}: not there", flush=True)
                continue
            report = json.loads([ln for ln in log.read_text().splitlines() if ln.startswith('{"tool"')][-1])
            rows.append({"label": f"{method} {'50%' if pattern == 'unstructured' else pattern}", "tool": "llmcompressor",
                         "version": report["version"], "method": method, "pattern": pattern,
                         "sparsity": report["sparsity"], "oneshot_s": round(report["seconds"], 1),
                         "perplexity": perplexity(out, work)})
            print(json.dumps(rows[-1]), flush=True)
        write_table(rows)
        return
    rows.append({"label": "dense", "tool": "-", "perplexity": perplexity(model, work)})
    print(json.dumps(rows[-1]), flush=True)

    for label, method, pattern, sparsity, extra in RUNS:
        out = work / ("llmprune-" + label.replace(" ", "-").replace("%", "").replace(":", "of"))
        cmd = [sys.executable, "-m", "llmprune.cli", "packaged:smollm2", "--method", method, "--pattern", pattern,
               "--calib-data", "sotu", "--nsamples", str(CALIB["nsamples"]), "--seqlen", str(CALIB["seqlen"]),
               "--seed", str(CALIB["seed"]), "-o", str(out), "--overwrite", "-q", *extra]
        if sparsity is not None:
            cmd += ["--sparsity", str(sparsity)]
        wall, _ = timed(cmd)
        recipe = json.loads((out / "llmprune.json").read_text())
        rows.append({"label": label, "tool": "llmprune", "method": method, "pattern": pattern,
                     "sparsity": recipe["sparsity"]["overall"], "wall_s": round(wall, 1),
                     "perplexity": perplexity(out, work)})
        print(json.dumps(rows[-1]), flush=True)

    if args.ours:
        (ROOT / "eval" / "quality-llmprune.json").write_text(json.dumps(rows, indent=2) + "\n")
        write_table(rows)
        return
    peer_python = ROOT / ".venv-peer" / "bin" / "python"
    if not args.no_peer and peer_python.exists():
        tok = AutoTokenizer.from_pretrained(model)
        calib = work / "calib.pt"
        torch.save(data.calibration_samples(tok, "sotu", CALIB["nsamples"], CALIB["seqlen"], CALIB["seed"]), calib)
        for method, pattern in PEER:
            out = work / f"llmcompressor-{method}-{pattern.replace(':', 'of')}"
            wall, stdout = timed([str(peer_python), str(ROOT / "scripts" / "peer_llmcompressor.py"), "--model", str(model),
                                  "--method", method, "--pattern", pattern, "--sparsity", "0.5", "--calib", str(calib),
                                  "--output", str(out)])
            report = json.loads(stdout.strip().splitlines()[-1])
            rows.append({"label": f"{method} {'50%' if pattern == 'unstructured' else pattern}", "tool": "llmcompressor",
                         "version": report["version"], "method": method, "pattern": pattern,
                         "sparsity": report["sparsity"], "wall_s": round(wall, 1), "oneshot_s": round(report["seconds"], 1),
                         "perplexity": perplexity(out, work)})
            print(json.dumps(rows[-1]), flush=True)

    write_table(rows)


def write_table(rows: list[dict]) -> None:
    (ROOT / "eval" / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| run | tool | sparsity | perplexity | wall s (whole process) | llm-compressor oneshot s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['tool']} | {r.get('sparsity', 0):.4f} | {r['perplexity']:.3f} | "
                     f"{r.get('wall_s', '')} | {r.get('oneshot_s', '')} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
