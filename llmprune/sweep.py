"""A grid of pruning runs, methods x sparsities, each evaluated on the very same windows.

What the grid points share, computed once: the evaluation windows (tokenised once), the dense
model's perplexity on them, and the calibration windows (sampled and tokenised once, reused by
every calibration-aware point). Each point is then a full ``pruning.prune`` into a temporary
model folder and a perplexity on the shared windows. The activations themselves are not shared
past the first layer: each point's layer inputs depend on the layers it has already pruned.

Output: ``sweep.md`` (tables), ``sweep.json`` (every number) and ``sweep.png`` (perplexity
against sparsity, one line per method, the dense perplexity as a reference line), written to a
hidden temporary folder renamed into place only when all of it is there.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import criteria, plots
from .calibrate import calibration_ids
from .card import public
from .config import SweepConfig
from .data import resolve_source
from .output import check_output, default_output, temp_output
from .perplexity import evaluate, load_windows
from .progress import track
from .pruning import prune
from .recipe import peak_rss_mb, versions
from .source import open_source

log = logging.getLogger(__name__)

SHARED = ("evaluation windows (tokenised once); dense perplexity (measured once); calibration windows "
          "(sampled and tokenised once). Not shared: per-layer activations, which depend on each point's pruning.")


def point_label(method: str, sparsity: float, pattern: str) -> str:
    return f"{method}-{pattern.replace(':', 'of')}" if pattern != "unstructured" else f"{method}-{sparsity:g}"


def shared_calibration(cfg: SweepConfig, source) -> torch.Tensor | None:
    """The calibration windows every calibration-aware point uses, or None when no point needs them."""
    if not any(criteria.get(m).needs_calibration for m in cfg.methods) and cfg.ratios != "owl":
        return None
    return calibration_ids(cfg.point(cfg.methods[0], cfg.sparsities[0], "unused"), source)


def run_point(cfg: SweepConfig, method: str, sparsity: float, folder: Path, windows: torch.Tensor, data: str,
              calib: torch.Tensor | None, command: str | None) -> dict:
    """Prune one grid point into ``folder`` and measure its perplexity on the shared windows."""
    start = time.perf_counter()
    recipe = prune(cfg.point(method, sparsity, str(folder)), command=command, progress=False,
                   calib_ids=calib if criteria.get(method).needs_calibration or cfg.ratios == "owl" else None)
    pruned_s = time.perf_counter() - start
    result = evaluate(str(folder), data, windows=windows, device=cfg.device, progress=False)
    return {"method": method, "pattern": cfg.pattern, "sparsity": sparsity,
            "achieved": recipe["sparsity"]["overall"], "perplexity": result.perplexity,
            "prune_s": round(pruned_s, 2), "eval_s": round(result.seconds, 2)}


def sweep(cfg: SweepConfig, command: str | None = None, progress: bool = True) -> dict:
    """Run the grid; returns the report also written as sweep.json."""
    start = time.perf_counter()
    source = open_source(cfg.model, cfg.revision)
    source.checkpoint.close()
    output = Path(cfg.output) if cfg.output else default_output(cfg.model, "sweep")
    check_output(output, source.folder, cfg.overwrite)
    data = resolve_source(cfg.eval)
    windows = load_windows(source.folder, data, cfg.eval_seqlen, cfg.eval_max_windows)
    dense = evaluate(str(source.folder), data, windows=windows, device=cfg.device, progress=progress)
    calib = shared_calibration(cfg, source)
    with temp_output(output, cfg.overwrite) as tmp:
        points = []
        grid = [(m, s) for m in cfg.methods for s in cfg.sparsities]
        for method, sparsity in track(grid, "sweep", "point", enabled=progress):
            folder = tmp / "models" / point_label(method, sparsity, cfg.pattern)
            points.append(run_point(cfg, method, sparsity, folder, windows, data, calib, command))
            log.info("%s at %.0f%%: perplexity %.3f", method, 100 * sparsity, points[-1]["perplexity"])
            if not cfg.keep_models:
                shutil.rmtree(folder)
        if not cfg.keep_models:
            shutil.rmtree(tmp / "models", ignore_errors=True)
        report = {
            "format": "llmprune-sweep/1", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command, "model": cfg.model, "config": cfg.to_dict(), "shared": SHARED,
            "eval": {"data": dense.data, "windows": dense.windows, "seqlen": dense.seqlen},
            "calibration": None if calib is None else {"data": cfg.calib_data, "nsamples": calib.shape[0],
                                                       "seqlen": calib.shape[1], "seed": cfg.seed},
            "dense": {"perplexity": dense.perplexity, "eval_s": dense.seconds}, "points": points,
            "wall_time_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "versions": versions(),
        }
        write_outputs(report, tmp)
    report["output"] = str(output)
    return report


def write_outputs(report: dict, folder: Path) -> None:
    (folder / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "sweep.md").write_text(markdown(report))
    pattern = report["config"]["pattern"]
    plots.sweep_lines(report["points"], report["dense"]["perplexity"], folder / "sweep.png",
                      f"{public(report['model'])} ({pattern}): perplexity on {public(report['eval']['data'])}")


def markdown(report: dict) -> str:
    """Perplexity by sparsity (rows) and method (columns), then every point in detail."""
    ev, dense, points = report["eval"], report["dense"]["perplexity"], report["points"]
    methods = list(dict.fromkeys(p["method"] for p in points))
    by = {(p["method"], p["sparsity"]): p for p in points}
    lines = [f"# Sweep: {report['model']}", "",
             f"Perplexity on `{ev['data']}`, {ev['windows']} windows of {ev['seqlen']} tokens (lower is better). "
             f"Pattern: {report['config']['pattern']}.", "",
             "| sparsity | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods),
             "| 0% (dense) | " + " | ".join(f"{dense:.3f}" for _ in methods) + " |"]
    for s in sorted(dict.fromkeys(p["sparsity"] for p in points)):
        cells = [f"{by[m, s]['perplexity']:.3f}" if (m, s) in by else "" for m in methods]
        lines.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "| method | target | achieved | perplexity | x dense | prune s | eval s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        lines.append(f"| {p['method']} | {p['sparsity']:.2%} | {p['achieved']:.2%} | {p['perplexity']:.3f} | "
                     f"{p['perplexity'] / dense:.2f} | {p['prune_s']:.1f} | {p['eval_s']:.1f} |")
    lines += ["", f"Shared across points: {report['shared']}", "", "![perplexity against sparsity](sweep.png)", "",
              "```", report.get("command") or "", "```", ""]
    return "\n".join(lines)
