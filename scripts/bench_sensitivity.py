"""Does a sensitivity ratio file beat uniform sparsity? SmolLM2, same mean, same protocol as quality.md.

For each method: `llmprune sensitivity` scans the packaged SmolLM2 (each layer pruned alone at
0.3, 0.5 and 0.7; damage = the layer's relative output error, `--metric recon`) and writes a
ratio file with the requested mean; the model is then pruned twice at that mean, uniformly and
with `--ratios` from the file, and both are evaluated on the quality protocol's windows (the
first 32 x 1024 tokens of the SOTU evaluation split, `llmprune eval`). Calibration for the scan
and the prunes: the quality protocol's 64 x 512 tokens of the SOTU calibration split, seed 0.

    python scripts/bench_sensitivity.py --methods magnitude,wanda --sparsity 0.5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import CALIB, CALIB_FLAGS, EVAL_SEQLEN, perplexity  # noqa: E402


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmprune.cli", *cmd], check=True)
    return round(time.perf_counter() - start, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="magnitude,wanda")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--spread", type=float, default=0.2)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--work", default="/tmp/llmprune-sensitivity")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        tag = f"{method}-{args.sparsity:g}"
        scan = work / f"scan-{tag}"
        scan_s = run(["sensitivity", "packaged:smollm2", "--method", method, "--sparsities", "0.3,0.5,0.7",
                      "--sparsity", str(args.sparsity), "--spread", str(args.spread), *CALIB_FLAGS, "-o", str(scan),
                      "--overwrite", "-q"])
        row = {"method": method, "mean_sparsity": args.sparsity, "spread": args.spread, "scan_s": scan_s}
        for kind, extra in (("uniform", []), ("sensitivity", ["--ratios", str(scan / "ratios.yaml")])):
            out = work / f"{kind}-{tag}"
            prune_s = run(["packaged:smollm2", "--method", method, "--sparsity", str(args.sparsity), *CALIB_FLAGS,
                           *extra, "-o", str(out), "--overwrite", "-q"])
            achieved = json.loads((out / "llmprune.json").read_text())["sparsity"]["overall"]
            row[kind] = {"perplexity": perplexity(out, args.eval_windows), "sparsity": achieved, "prune_s": prune_s}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n| method | mean sparsity | uniform ({args.eval_windows} x {EVAL_SEQLEN}) | sensitivity ratios | better |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        u, s = r["uniform"]["perplexity"], r["sensitivity"]["perplexity"]
        print(f"| {r['method']} | {r['mean_sparsity']:g} | {u:.3f} | {s:.3f} | {'sensitivity' if s < u else 'uniform'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": CALIB, "eval_windows": args.eval_windows,
                                               "eval_seqlen": EVAL_SEQLEN, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
