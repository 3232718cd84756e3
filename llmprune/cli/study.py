"""The other commands: push, decompress, inspect, sweep and sensitivity."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..config import SensitivityConfig, SweepConfig
from ..inspection import inspect, render
from ..progress import setup_logging, table
from ..sensitivity import sensitivity
from ..sharing import decompress, push
from ..sweep import markdown, sweep
from .commands import Parser, add_calibration_options, add_eval_window_options, add_log_format, options
from .summaries import report


def push_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmprune push", description="Upload an llmprune output folder to the Hugging Face Hub as one commit.",
               epilog="Credentials: the saved login (hf auth login) or HF_TOKEN. HF_ENDPOINT selects another Hub.")
    p.add_argument("folder", help="a complete llmprune output folder")
    p.add_argument("repo_id", help="NAMESPACE/NAME; created when missing")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", metavar="BRANCH", help="branch to push to (created when missing; default main)")
    p.add_argument("--commit-message", help="commit message (default: a summary of the recipe)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    add_log_format(p)
    return p


def run_push(argv: list[str]) -> int:
    args = push_parser().parse_args(argv)
    setup_logging(args.quiet, args.log_format)

    pushed = push(Path(args.folder), args.repo_id, args.private, args.revision, args.commit_message)
    if not args.quiet:
        print(f"pushed {args.folder} to {pushed['repo_id']}@{pushed['revision']}: {pushed['commit_url']}")
    return 0


def decompress_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmprune decompress",
               description="Write a sparse-bitmask llmprune output as a dense Hugging Face checkpoint, "
                           "for runtimes that do not import llmprune (streamed, one tensor at a time).")
    p.add_argument("folder", help="an llmprune output saved with --save-format sparse-bitmask")
    p.add_argument("output", help="the dense output folder")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_log_format(p)
    return p


def run_decompress(argv: list[str]) -> int:
    args = decompress_parser().parse_args(argv)
    setup_logging(args.quiet, args.log_format)

    recipe = decompress(Path(args.folder), Path(args.output), args.overwrite, args.max_shard_size, not args.quiet)
    if not args.quiet:
        print(f"wrote {args.output}: dense, {recipe['save']['bytes'] / 1e6:.1f} MB")
    return 0


INSPECT_EXAMPLES = """examples:
  llmprune inspect ./smollm2-magnitude-2of4
  llmprune inspect meta-llama/Llama-2-70b-hf --n-m 2:4 --json > report.json

Reads the checkpoint one tensor at a time (memory: one tensor). A matrix is N:M valid when every
group of M consecutive weights along its input dimension holds at least N zeros.
"""


def inspect_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmprune inspect", epilog=INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Show each decoder layer's matrices: shape, dtype, sparsity, N:M validity; totals and recipe.")
    p.add_argument("model", help="local folder, Hub id, or packaged:smollm2")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--n-m", default="2:4,4:8", help="N:M patterns to check, comma-separated (default 2:4,4:8)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_log_format(p)
    return p


def run_inspect(argv: list[str]) -> int:
    args = inspect_parser().parse_args(argv)
    setup_logging(args.quiet, args.log_format)
    import json


    result = inspect(args.model, args.revision, args.n_m, progress=not args.quiet)
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0


SWEEP_EXAMPLES = """examples:
  llmprune sweep packaged:smollm2 --sparsities 0.3,0.5,0.6,0.7 --methods magnitude,wanda,sparsegpt
  llmprune sweep ./my-model --pattern 2:4 --methods magnitude,wanda --eval wikitext2 -o sweep-2of4

Writes <output>/sweep.md, sweep.json and sweep.png (perplexity against sparsity, one line per
method, the dense perplexity dashed). Every point is evaluated on the same windows; the dense
perplexity and the calibration windows are computed once and shared by all points.
"""


def study_parser(prog: str, description: str, epilog: str, calibration: str, evaluation: str) -> argparse.ArgumentParser:
    """The options sweep and sensitivity share: model, output, device, calibration and evaluation windows."""
    p = Parser(prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="local folder, Hub id, or packaged:smollm2")
    p.add_argument("--output", "-o", help=f"output folder (default: ./<model>-{prog.split()[-1]})")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--norm", default="l1", choices=["l1", "l2"], help="norm of a pruned unit's weights")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    add_log_format(p)
    add_calibration_options(p.add_argument_group(calibration))
    e = p.add_argument_group(evaluation)
    e.add_argument("--eval", metavar="DATA", default="auto", help="sotu, wikitext2, c4, auto (default) or a path")
    add_eval_window_options(e)
    return p


def sweep_parser() -> argparse.ArgumentParser:
    p = study_parser("llmprune sweep", "Prune a grid of methods x sparsities and compare their perplexity.",
                     SWEEP_EXAMPLES, "calibration (wanda, sparsegpt, --ratios owl)", "evaluation")
    p.add_argument("--sparsities", help="comma-separated, e.g. 0.3,0.5,0.6,0.7 (default; N/M for an N:M pattern)")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="comma-separated (default: all three)")
    p.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M")
    p.add_argument("--ratios", help="rules file or owl, applied at every point")
    p.add_argument("--schedule", help="depth schedule at every point, e.g. linear:0.2")
    p.add_argument("--keep-models", action="store_true", help="keep every pruned model under <output>/models")
    return p


def run_study(name: str, argv: list[str], parser: argparse.ArgumentParser, config: type, run) -> tuple:
    """Parse, configure, run: (args, config, result) of ``llmprune sweep`` / ``sensitivity``."""
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.log_format)
    cfg = config(**options(args, config))
    return args, cfg, run(cfg, command=shlex.join(["llmprune", name, *argv]), progress=not args.quiet)


def run_sweep(argv: list[str]) -> int:
    args, _, result = run_study("sweep", argv, sweep_parser(), SweepConfig, sweep)
    by_sparsity = markdown(result).split("\n\n")[2]  # the perplexity table
    data = {k: result[k] for k in ("output", "dense", "points", "wall_time_s", "peak_rss_mb")}
    report(f"{by_sparsity}\n\nwrote {result['output']}/sweep.md, sweep.json, sweep.png", data, args.quiet)
    return 0


SENSITIVITY_EXAMPLES = """examples:
  llmprune sensitivity packaged:smollm2 --sparsities 0.3,0.5,0.7 --sparsity 0.6
  llmprune sensitivity ./my-model --method wanda --metric ppl --eval sotu --eval-max-windows 4
  llmprune ./my-model --method wanda --sparsity 0.6 --ratios my-model-sensitivity/ratios.yaml

Each decoder layer is pruned alone at each of --sparsities; the damage is the layer's relative
output error on calibration data (--metric recon, one streamed pass) or the model's perplexity
(--metric ppl). Writes ratios.yaml (for --ratios: robust layers get more sparsity, fragile ones
less, parameter-weighted mean --sparsity), sensitivity.json, sensitivity.md and sensitivity.png.
"""


def sensitivity_parser() -> argparse.ArgumentParser:
    p = study_parser("llmprune sensitivity", "Measure how much pruning each decoder layer hurts; write a ratio file.",
                     SENSITIVITY_EXAMPLES, "calibration", "evaluation (--metric ppl)")
    p.add_argument("--sparsities", default="0.3,0.5,0.7", help="ratios each layer is probed at (default 0.3,0.5,0.7)")
    p.add_argument("--sparsity", type=float, default=0.5, help="mean sparsity of the ratio file (default 0.5)")
    p.add_argument("--spread", type=float, default=0.2, help="most robust minus most fragile layer's sparsity (default 0.2)")
    p.add_argument("--method", default="magnitude", help="magnitude (default), wanda or sparsegpt")
    p.add_argument("--metric", default="recon", help="recon (default: layer output error) or ppl (perplexity)")
    return p


def run_sensitivity(argv: list[str]) -> int:
    args, cfg, result = run_study("sensitivity", argv, sensitivity_parser(), SensitivityConfig, sensitivity)
    layers = [row["sparsity"] for row in result["layers"]]
    rows = [("model", result["model"]), ("metric", f"{cfg.metric}, {cfg.method} at {', '.join(map(str, cfg.sparsities))}"),
            ("allocated", f"min {min(layers):.2%}, max {max(layers):.2%}, mean {cfg.sparsity:.2%} (parameter-weighted)"),
            ("ratio file", f"{result['output']}/{result['ratio_file']}"), ("output", result["output"])]
    report(table(rows), {"output": result["output"], "layers": result["layers"]}, args.quiet)
    return 0
