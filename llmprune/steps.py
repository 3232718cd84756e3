"""Calibration-aware pruning over the layer stream, and the OWL pre-pass.

Sequential propagation (SparseGPT / Wanda): the calibration windows' hidden states entering
layer 0 are captured once; then for each decoder layer, as the engine streams it: hooks on its
linears feed their inputs to the criterion's statistics while the states run through the layer,
the linears are pruned in place, and the states run through the pruned layer again to become the
next layer's inputs. With ``true_sequential`` the linears are pruned group by group in execution
order (e.g. q/k/v, then o, then gate/up, then down), each group's statistics seeing the earlier
groups already pruned. Memory is O(one layer + calibration activations).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from . import criteria, ratios, resume
from .arch import ModelWithoutLayers, as_out_in
from .calibrate import calibration, collect_stats, input_groups
from .config import PruneConfig
from .criteria import wanda
from .errors import LlmpruneError
from .masks import Pattern
from .sizing import calibration_batch
from .source import Source, prunable_matrices
from .stream import Activations, Layer
from .stream import layers as stream_layers

log = logging.getLogger(__name__)


@dataclass
class CalibratedPruneStep:
    """The engine step for criteria that need activations (Wanda, SparseGPT)."""

    criterion: ModuleType
    targets: dict[str, float]
    pattern: Pattern
    norm: str
    acts: Activations
    true_sequential: bool = False
    zeros: dict[str, int] = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        module = layer.module()  # shares storage with layer.tensors: pruning in place updates both
        linears = {name: (lin, module.get_submodule(lin.name)) for lin, name in layer.linears()}
        todo = [n for n in linears if self.targets.get(n, 0.0) > 0]
        groups = input_groups(module, layer.index, self.acts, linears) if self.true_sequential else [todo]
        for group in groups:
            group = {n: linears[n] for n in group if n in todo}
            if not group:
                continue
            stats = collect_stats(self.criterion, module, layer.index, self.acts, group)
            for name, (lin, sub) in group.items():
                weight = as_out_in(sub.weight, lin)
                pruned, _ = self.criterion.prune(weight, self.targets[name], self.pattern, stats.pop(name), self.norm)
                weight.copy_(pruned)
        self.acts.advance(module, layer.index)
        for name in linears:
            t = layer.tensors[name]
            self.zeros[name] = t.numel() - int(torch.count_nonzero(t))
        return layer.tensors


@dataclass
class OutlierStep:
    """OWL pre-pass step: each dense layer's share of outlier Wanda scores; writes nothing.

    The share is over all the layer's prunable weights together: scores above ``m`` times their
    mean (OWL's layerwise outlier distribution, M = 5 by default).
    """

    acts: Activations
    m: float = 5.0
    ratios: list[float] = field(default_factory=list)

    @torch.no_grad()
    def __call__(self, layer: Layer) -> None:
        module = layer.module()
        linears = {name: (lin, module.get_submodule(lin.name)) for lin, name in layer.linears()}
        stats = collect_stats(wanda, module, layer.index, self.acts, linears)
        above = total = 0
        score_sum = 0.0
        scores = {}
        for name, (lin, sub) in linears.items():
            scores[name] = wanda.scores(as_out_in(sub.weight, lin), stats[name])
            score_sum += float(scores[name].sum(dtype=torch.float64))
            total += scores[name].numel()
        mean = score_sum / total
        for s in scores.values():
            above += int(torch.count_nonzero(s > self.m * mean))
        self.ratios.append(above / total)
        self.acts.advance(module, layer.index)


def plan_sparsity(cfg: PruneConfig, source: Source) -> dict[str, float]:
    """Target sparsity of every prunable matrix, checked against the pattern."""
    matrices = prunable_matrices(source)
    rules = ratios.load_rules(cfg.ratios) if cfg.ratios and cfg.ratios != "owl" else None
    schedule = ratios.parse_schedule(cfg.schedule) if cfg.schedule else None
    targets = ratios.assign(matrices, cfg.sparsity, rules, schedule, rules_source=f"ratio file {cfg.ratios}")
    pattern = cfg.parsed_pattern
    if pattern.kind == "nm":
        for name, s in targets.items():
            if s not in (0.0, pattern.sparsity):
                raise LlmpruneError(f"{name}: sparsity {s} cannot be reached with {pattern}: use 0 or {pattern.sparsity}")
        check_n_m_shapes(source, pattern, targets)
    return targets


def check_n_m_shapes(source: Source, pattern: Pattern, targets: dict[str, float]) -> None:
    """Refuse before writing anything when an input dimension is not a multiple of M."""
    for index in range(source.layout.num_layers):
        for linear, name in source.layout.linear_names(index):
            if targets.get(name):
                shape = source.checkpoint.spec(name).shape
                fan_in = shape[0] if linear.transposed else shape[1]
                if fan_in % pattern.m:
                    raise LlmpruneError(f"{name}: input dimension {fan_in} is not a multiple of M={pattern.m}")


@dataclass
class PruneStep:
    """Prune every targeted matrix of a layer with one criterion; count the zeros written."""

    criterion: object
    targets: dict[str, float]
    pattern: Pattern
    norm: str
    zeros: dict[str, int] = field(default_factory=dict)

    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        out = dict(layer.tensors)
        for linear, name in layer.linears():
            sparsity = self.targets.get(name, 0.0)
            if sparsity > 0:
                weight = as_out_in(out[name], linear)
                pruned, _ = self.criterion.prune(weight, sparsity, self.pattern, None, self.norm)
                out[name] = pruned.t() if linear.transposed else pruned
            self.zeros[name] = out[name].numel() - int(torch.count_nonzero(out[name]))
        return out


def owl_targets(cfg: PruneConfig, source: Source, outer: ModelWithoutLayers, ids: torch.Tensor, store: torch.device | Path,
                device: torch.device, progress: bool) -> tuple[dict[str, float], list[float]]:
    """OWL: a read-only pass over the dense layers measures outliers; ratios follow from them."""
    step = OutlierStep(Activations(outer, ids, calibration_batch(device, ids.shape[1]), store), cfg.owl_m)
    for layer in stream_layers(source.checkpoint, source.layout, device, desc="owl outliers", progress=progress):
        step(layer)
    targets = ratios.owl(prunable_matrices(source), cfg.sparsity, step.ratios, cfg.owl_lambda)
    per_layer = [targets[m.name] for m in prunable_matrices(source)]
    log.info("owl: layer sparsity from %.3f to %.3f", min(per_layer), max(per_layer))
    return targets, step.ratios


def make_step(cfg: PruneConfig, source: Source, device: torch.device, store: torch.device | Path,
              targets: dict[str, float], journal: resume.Journal, progress: bool,
              calib_ids: torch.Tensor | None = None) -> tuple[PruneStep | CalibratedPruneStep, Activations | None,
                                                              tuple[int, int] | None]:
    """The engine step for ``cfg``, its calibration states when the criterion needs them, and the
    calibration windows' shape (windows, tokens) when any were used (OWL's pass uses them too).

    With ``--ratios owl`` the targets are OWL's, from the journal when a resumed run has them."""
    criterion = criteria.get(cfg.method)
    if not (criterion.needs_calibration or cfg.ratios == "owl"):
        return PruneStep(criterion, targets, cfg.parsed_pattern, cfg.norm), None, None
    outer, ids = calibration(cfg, source, device, store, calib_ids)
    if cfg.ratios == "owl":
        if journal.before.owl is None:
            owl, outliers = owl_targets(cfg, source, outer, ids, store, device, progress)
            journal.remember(owl={"targets": owl, "outlier_ratios": outliers})
        targets = journal.before.owl["targets"]
    if not criterion.needs_calibration:
        return PruneStep(criterion, targets, cfg.parsed_pattern, cfg.norm), None, tuple(ids.shape)
    acts = Activations(outer, ids, calibration_batch(device, ids.shape[1]), store)
    step = CalibratedPruneStep(criterion, targets, cfg.parsed_pattern, cfg.norm, acts, cfg.true_sequential)
    return step, acts, tuple(ids.shape)
