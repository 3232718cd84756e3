"""OWL's lambda chosen on a held-out split, then checked once on the quality protocol's windows.

OWL's outlier ratios depend only on the dense model, the calibration windows and M, so they are
read from one `--ratios owl` run (its llmprune.json, e.g. the quality benchmark's "wanda 70% owl"
output, M = 5) and turned into per-layer ratio files for each lambda with `llmprune.ratios.owl`,
exactly as `--ratios owl --owl-lambda L` would. Each file is pruned with Wanda at the same mean
sparsity (uniform = lambda 0) and scored on a validation split that the evaluation never uses: the
last speeches of the SOTU calibration split (before 2000), 16 x 1024 tokens. The lambda that wins
there is then evaluated once on the quality protocol's test windows (SOTU from 2000, 32 x 1024).

    python scripts/bench_owl.py --owl-run /tmp/llmprune-quality/llmprune-wanda-70-owl --lambdas 0,0.02,0.04,0.08
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import CALIB, CALIB_FLAGS, perplexity  # noqa: E402

from llmprune import data, ratios  # noqa: E402
from llmprune.source import open_source, prunable_matrices  # noqa: E402


def validation_folder(work: Path, speeches: int) -> Path:
    folder = work / "validation"
    if not folder.exists():
        folder.mkdir(parents=True)
        for i, text in enumerate(data.load_texts("sotu", "calib")[-speeches:]):
            (folder / f"{i:02d}.txt").write_text(text)
    return folder


def validation_ppl(model: Path, folder: Path, windows: int) -> float:
    cache = model.with_name(f"{model.name}.val{windows}.json")
    if not cache.exists():
        subprocess.run([sys.executable, "-m", "llmprune.cli", "eval", str(model), "--data", str(folder), "--seqlen",
                        "1024", "--max-windows", str(windows), "--json", str(cache), "-q"], check=True)
    return json.loads(cache.read_text())["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owl-run", required=True, help="output folder of a --ratios owl prune (its outlier ratios)")
    ap.add_argument("--lambdas", default="0,0.02,0.04,0.08")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--speeches", type=int, default=12, help="last N calibration-split speeches for validation")
    ap.add_argument("--val-windows", type=int, default=16)
    ap.add_argument("--work", default="/tmp/llmprune-owl")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    owl = json.loads((Path(args.owl_run) / "llmprune.json").read_text())["owl"]
    matrices = prunable_matrices(open_source("packaged:smollm2"))
    val = validation_folder(work, args.speeches)
    rows = []
    for lam in (float(x) for x in args.lambdas.split(",")):
        out = work / f"wanda-{args.sparsity:g}-lambda{lam:g}"
        extra = []
        if lam > 0:
            per_matrix = ratios.owl(matrices, args.sparsity, owl["outlier_ratios"], lam)
            per_layer = {m.layer: per_matrix[m.name] for m in matrices}
            ratio_file = work / f"owl-lambda{lam:g}.yaml"
            ratio_file.write_text("".join(f'"model.layers.{i}.*": {s:.6f}\n' for i, s in sorted(per_layer.items())))
            extra = ["--ratios", str(ratio_file)]
        if not (out / "config.json").exists():
            subprocess.run([sys.executable, "-m", "llmprune.cli", "packaged:smollm2", "--method", "wanda", "--sparsity",
                            str(args.sparsity), *CALIB_FLAGS, *extra, "-o", str(out), "--overwrite", "-q"], check=True)
        achieved = json.loads((out / "llmprune.json").read_text())["sparsity"]["overall"]
        rows.append({"lambda": lam, "m": owl["m"], "sparsity": achieved, "folder": str(out),
                     "validation_ppl": validation_ppl(out, val, args.val_windows)})
        print(json.dumps(rows[-1]), flush=True)
    best = min(rows, key=lambda r: r["validation_ppl"])
    uniform = next((r for r in rows if r["lambda"] == 0), None)
    for r in {id(best): best, id(uniform): uniform}.values():
        if r is not None:
            r["test_ppl"] = perplexity(Path(r["folder"]), 32)
    print(json.dumps({"chosen_lambda": best["lambda"], "rows": rows}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": CALIB, "validation": {
            "speeches": f"last {args.speeches} of the SOTU calibration split", "windows": args.val_windows,
            "seqlen": 1024}, "chosen_lambda": best["lambda"], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
