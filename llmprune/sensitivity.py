"""Layer sensitivity: prune one decoder layer at a time at several ratios, measure the damage,
and allocate per-layer sparsity by it.

Damage (``--metric``):

* ``recon`` (cheap, one streamed pass): the layer's relative output reconstruction error on the
  calibration windows, ``||f_pruned(X) - f(X)||^2 / ||f(X)||^2``, where X are the dense model's
  states entering the layer. Layers stream from the shards as in a prune; memory is O(one layer +
  two sets of activations). Nothing is written.
* ``ppl``: the whole model's perplexity with only that layer pruned (L x ratios evaluations of a
  model held in memory; for small models).

Allocation: each layer's score is the mean log damage over the probed ratios, min-max scaled to
t in [0, 1]; its sparsity is ``mean + shift + spread * (1/2 - t)``, the shift solved so that the
parameter-weighted mean over the prunable matrices is exactly ``mean`` (``ratios.centred``):
robust layers (low damage) get up to ``spread / 2`` more, fragile ones up to ``spread / 2`` less.
The result is a rules file (one glob per decoder layer) that ``--ratios`` reads.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from . import criteria, plots, ratios
from .arch import Layout, Linear, as_out_in, find_layers
from .calibrate import _hooks, calibration, calibration_ids, collect_stats
from .card import public
from .config import SensitivityConfig
from .data import resolve_source
from .devices import resolve_device
from .masks import Pattern
from .output import check_output, default_output, temp_output
from .perplexity import evaluate, load_model, load_windows
from .progress import track
from .recipe import versions
from .sizing import calibration_batch, calibration_store
from .source import Source, open_source, prunable_matrices
from .stream import Activations, Layer
from .stream import layers as stream_layers

log = logging.getLogger(__name__)

RATIO_FILE = "ratios.yaml"
Linears = dict[str, tuple[Linear, nn.Module]]  # checkpoint name -> (linear, its module)


def prune_linears(criterion: ModuleType, linears: Linears, originals: dict[str, torch.Tensor], sparsity: float,
                  stats: dict, norm: str) -> None:
    """Set each linear's weight to its original pruned at ``sparsity`` (unstructured), in place."""
    for name, (lin, sub) in linears.items():
        pruned, _ = criterion.prune(as_out_in(originals[name], lin), sparsity, Pattern(), stats.get(name), norm)
        as_out_in(sub.weight, lin).copy_(pruned)


def restore(linears: Linears, originals: dict[str, torch.Tensor]) -> None:
    for name, (_, sub) in linears.items():
        sub.weight.copy_(originals[name])


def relative_error(acts: Activations, module: nn.Module, index: int, dense: list[torch.Tensor]) -> float:
    """||layer(X) - dense||^2 / ||dense||^2 over every calibration chunk."""
    num = den = 0.0
    for out, ref in zip(acts.each_output(module, index), dense):
        ref = ref.to(out.device, torch.float32)
        num += float((out.float() - ref).square().sum(dtype=torch.float64))
        den += float(ref.square().sum(dtype=torch.float64))
    return num / den if den else 0.0


@dataclass
class DamageStep:
    """Engine step (writes nothing): the layer's reconstruction error at each ratio, then the dense states advance."""
    criterion: ModuleType
    sparsities: tuple[float, ...]
    norm: str
    acts: Activations
    damage: list[dict[float, float]] = field(default_factory=list)

    @torch.no_grad()
    def __call__(self, layer: Layer) -> None:
        module = layer.module()
        linears = {name: (lin, module.get_submodule(lin.name)) for lin, name in layer.linears()}
        stats = collect_stats(self.criterion, module, layer.index, self.acts, linears) \
            if self.criterion.needs_calibration else {}
        dense = self.acts.outputs(module, layer.index)  # also the next layer's inputs
        originals = {name: sub.weight.detach().clone() for name, (_, sub) in linears.items()}
        row = {}
        for s in self.sparsities:
            prune_linears(self.criterion, linears, originals, s, stats, self.norm)
            row[s] = relative_error(self.acts, module, layer.index, dense)
        restore(linears, originals)
        self.acts.hidden = dense
        self.damage.append(row)


def recon_damage(cfg: SensitivityConfig, source: Source, device: torch.device, progress: bool) -> list[dict]:
    probe = cfg.probe(cfg.sparsity)
    store = calibration_store(probe, source, device)
    outer, ids = calibration(probe, source, device, store)
    acts = Activations(outer, ids, calibration_batch(device, ids.shape[1]), store)
    step = DamageStep(criteria.get(cfg.method), cfg.sparsities, cfg.norm, acts)
    for layer in stream_layers(source.checkpoint, source.layout, device, desc="sensitivity", progress=progress):
        step(layer)
    return step.damage


@torch.no_grad()
def model_stats(criterion: ModuleType, model: nn.Module, linears: Linears, ids: torch.Tensor) -> dict:
    """The criterion's statistics of ``linears`` from the dense model run on the calibration windows."""
    stats = {name: criterion.init_stats(as_out_in(sub.weight, lin)) for name, (lin, sub) in linears.items()}
    handles = _hooks(model, linears, lambda name, x: criterion.accumulate(stats[name], x.reshape(-1, x.shape[-1])))
    try:
        for chunk in ids.split(calibration_batch(model.device, ids.shape[1])):
            model(input_ids=chunk.to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def ppl_damage(cfg: SensitivityConfig, source: Source, device: torch.device, progress: bool) -> tuple[list[dict], float]:
    """Perplexity with one layer pruned at a time, on a model held in memory; and the dense perplexity."""
    criterion = criteria.get(cfg.method)
    windows = load_windows(source.folder, resolve_source(cfg.eval), cfg.eval_seqlen, cfg.eval_max_windows)
    ids = calibration_ids(cfg.probe(cfg.sparsity), source) if criterion.needs_calibration else None
    model = load_model(source, device, torch.float32, progress)
    dense = evaluate(model, windows=windows, progress=False).perplexity
    _, layers = find_layers(model)
    damage = []
    for index in track(range(len(layers)), "sensitivity (ppl)", "layer", enabled=progress):
        linears = {name: (lin, layers[index].get_submodule(lin.name)) for lin, name in source.layout.linear_names(index)}
        stats = model_stats(criterion, model, linears, ids) if ids is not None else {}
        originals = {name: sub.weight.detach().clone() for name, (_, sub) in linears.items()}
        row = {}
        for s in cfg.sparsities:
            prune_linears(criterion, linears, originals, s, stats, cfg.norm)
            row[s] = evaluate(model, windows=windows, progress=False).perplexity
        restore(linears, originals)
        damage.append(row)
    return damage, dense


def allocate(damage: list[dict[float, float]], matrices: list[ratios.Matrix], mean: float,
             spread: float) -> list[float]:
    """Per-layer sparsity: more to low-damage layers, parameter-weighted mean exactly ``mean``."""
    scores = [sum(math.log(max(d, 1e-12)) for d in row.values()) / len(row) for row in damage]
    lo, hi = min(scores), max(scores)
    scaled = [(s - lo) / (hi - lo) if hi > lo else 0.5 for s in scores]
    targets = ratios.centred(matrices, mean, {m.name: spread * (0.5 - scaled[m.layer]) for m in matrices})
    per_layer = [mean] * len(damage)
    for m in matrices:
        per_layer[m.layer] = targets[m.name]
    return per_layer


def layer_rule(layout: Layout, index: int) -> str:
    """A glob matching every checkpoint tensor of decoder layer ``index`` and of no other layer."""
    return layout.checkpoint_name(layout.layer_prefix(index)) + "*"


def ratio_file(cfg: SensitivityConfig, layout: Layout, allocation: list[float]) -> str:
    lines = [f"# llmprune sensitivity of {cfg.model}: {cfg.method}, metric {cfg.metric}, probed at "
             f"{', '.join(f'{s:g}' for s in cfg.sparsities)}",
             f"# per-layer sparsity, parameter-weighted mean {cfg.sparsity:g}, spread {cfg.spread:g}; use with:",
             f"#   llmprune {cfg.model} --method {cfg.method} --sparsity {cfg.sparsity:g} --ratios {RATIO_FILE}"]
    lines += [f"{json.dumps(layer_rule(layout, i))}: {round(s, 6)}" for i, s in enumerate(allocation)]
    return "\n".join(lines) + "\n"


def sensitivity(cfg: SensitivityConfig, command: str | None = None, progress: bool = True) -> dict:
    """Scan every decoder layer; write ratios.yaml, sensitivity.json, sensitivity.md and sensitivity.png."""
    source = open_source(cfg.model, cfg.revision)
    output = Path(cfg.output) if cfg.output else default_output(cfg.model, "sensitivity")
    check_output(output, source.folder, cfg.overwrite)
    device = resolve_device(cfg.device)
    try:
        if cfg.metric == "recon":
            damage, dense = recon_damage(cfg, source, device, progress), None
        else:
            damage, dense = ppl_damage(cfg, source, device, progress)
    finally:
        source.checkpoint.close()
    allocation = allocate(damage, prunable_matrices(source), cfg.sparsity, cfg.spread)
    report = {"format": "llmprune-sensitivity/1", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": command, "model": cfg.model, "config": cfg.to_dict(), "dense_perplexity": dense,
              "layers": [{"layer": i, "damage": {f"{s:g}": d for s, d in row.items()}, "sparsity": allocation[i],
                          "rule": layer_rule(source.layout, i)} for i, row in enumerate(damage)],
              "ratio_file": RATIO_FILE, "versions": versions()}
    with temp_output(output, cfg.overwrite) as tmp:
        (tmp / RATIO_FILE).write_text(ratio_file(cfg, source.layout, allocation))
        (tmp / "sensitivity.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "sensitivity.md").write_text(markdown(report))
        label = "relative output error" if cfg.metric == "recon" else "perplexity"
        plots.sensitivity_lines(damage, allocation, label, tmp / "sensitivity.png",
                                f"{public(cfg.model)}: {cfg.method}, one layer pruned at a time")
    report["output"] = str(output)
    return report


def markdown(report: dict) -> str:
    cfg = report["config"]
    probes = [f"{s:g}" for s in cfg["sparsities"]]
    what = "relative output error of the layer" if cfg["metric"] == "recon" else "perplexity of the model"
    lines = [f"# Layer sensitivity: {report['model']}", "",
             f"Each decoder layer pruned alone ({cfg['method']}) at {', '.join(probes)}; damage: {what}. "
             f"Allocated sparsity: parameter-weighted mean {cfg['sparsity']:g}, spread {cfg['spread']:g} "
             f"(`{report['ratio_file']}`).", ""]
    if report["dense_perplexity"] is not None:
        lines += [f"Dense perplexity: {report['dense_perplexity']:.3f}.", ""]
    lines += ["| layer | " + " | ".join(f"at {p}" for p in probes) + " | allocated |",
              "|---:|" + "---:|" * (len(probes) + 1)]
    for row in report["layers"]:
        cells = " | ".join(f"{row['damage'][p]:.4g}" for p in probes)
        lines.append(f"| {row['layer']} | {cells} | {row['sparsity']:.2%} |")
    lines += ["", "![damage per layer](sensitivity.png)", "", "```", report.get("command") or "", "```", ""]
    return "\n".join(lines)
