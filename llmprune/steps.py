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
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
from torch import nn

from . import criteria, ratios, resume
from .arch import Linear, ModelWithoutLayers, as_out_in
from .calibrate import calibration, collect_stats, input_groups
from .config import PruneConfig
from .criteria import magnitude, wanda
from .errors import LlmpruneError
from .experts import GATE, UP, ExpertMatrix, ExpertWeight, MoeBlock, gated_activation, routing_hook
from .masks import Pattern
from .sizing import calibration_batch
from .source import Source, prunable_matrices, vision_matrices
from .stream import Activations, Layer
from .stream import layers as stream_layers

log = logging.getLogger(__name__)

MIN_EXPERT_TOKENS = 16  # an expert routed fewer calibration tokens is pruned by magnitude


@dataclass
class RoutedStats:
    """A criterion's statistics per routed expert, from the tokens its router sends it: the expert's
    gate|up matrices share those of the routed rows (n, H), its down those of ``act(gate) * up``."""

    criterion: ModuleType
    every_expert: bool = False  # --moe-calibration all: every calibration token through every expert
    stats: dict[tuple[str, int, str], object] = field(default_factory=dict)

    @staticmethod
    def key(matrix: ExpertMatrix) -> tuple[str, int, str]:
        return matrix.weight.container, matrix.expert, "out" if _is_down(matrix.weight) else "in"

    def get(self, matrix: ExpertMatrix) -> object | None:
        """The statistics of ``matrix``, or None when too few tokens reached its expert."""
        stats = self.stats.get(self.key(matrix))
        return stats if stats is not None and stats.tokens >= MIN_EXPERT_TOKENS else None

    @contextmanager
    def collecting(self, module: nn.Module, blocks: list[MoeBlock]) -> Iterator[None]:
        """Accumulate on every forward of ``module`` (a decoder layer) while open."""
        with ExitStack() as stack:
            for block in blocks:
                if any(w.fused for w in block.weights):
                    stack.enter_context(routing_hook(module, block, partial(self._on_routed, module, block),
                                                     self.every_expert))
            yield

    def _on_routed(self, module: nn.Module, block: MoeBlock, e: int, rows: torch.Tensor, *_) -> None:
        rows = rows.reshape(-1, rows.shape[-1])  # (n, H)
        inputs = [w for w in block.weights if w.fused and not _is_down(w)]
        downs = [w for w in block.weights if w.fused and _is_down(w)]
        if inputs:
            self._add((block.experts, e, "in"), _matrix(module, inputs[0], e, GATE if inputs[0].gate_up else None), rows)
        if downs:
            hidden = _expert_hidden(module, block, inputs, e, rows)
            if hidden is not None:
                self._add((block.experts, e, "out"), _matrix(module, downs[0], e), hidden)

    def _add(self, key: tuple[str, int, str], weight: torch.Tensor, x: torch.Tensor) -> None:
        if key not in self.stats:
            self.stats[key] = self.criterion.init_stats(weight)
        self.criterion.accumulate(self.stats[key], x)


def _is_down(weight: ExpertWeight) -> bool:
    return weight.name.startswith("down")


def _matrix(module: nn.Module, weight: ExpertWeight, e: int, part: str | None = None) -> torch.Tensor:
    """Expert ``e``'s (out, in) matrix of ``weight`` in the layer ``module``."""
    return weight.view(module.get_parameter(weight.param()), e, part)


def _expert_hidden(module: nn.Module, block: MoeBlock, inputs: list[ExpertWeight], e: int,
                   rows: torch.Tensor) -> torch.Tensor | None:
    """``act(gate) * up`` (n, I) of expert ``e`` for routed ``rows`` (n, H), in float32; None when the
    gate and up matrices or the activation cannot be told apart."""

    def linear(weight: ExpertWeight, part: str | None) -> torch.Tensor:
        y = rows.float() @ _matrix(module, weight, e, part).float().T
        if weight.bias is not None:
            y += weight.bias_view(module.get_parameter(weight.bias_params()[0]), e, part).float()
        return y

    if len(inputs) == 1 and inputs[0].gate_up:
        gate, up = linear(inputs[0], GATE), linear(inputs[0], UP)
    else:
        named = {w.name.split("_")[0]: w for w in inputs}
        if set(named) != {"gate", "up"}:
            return None
        gate, up = linear(named["gate"], None), linear(named["up"], None)
    return gated_activation(module.get_submodule(block.experts), gate, up)


def prune_experts(layer: Layer, criterion: ModuleType, targets: dict[str, float], pattern: Pattern, norm: str,
                  zeros: dict[str, int], routed: RoutedStats | None = None) -> None:
    """Prune every targeted expert matrix of ``layer`` in place and count its zeros. With ``routed``
    (calibrated criteria) an expert without enough routed tokens falls back to magnitude."""
    fallback = 0
    for expert, view in layer.experts():
        sparsity = targets.get(expert.name, 0.0)
        if sparsity > 0:
            stats = routed.get(expert.matrix) if routed is not None else None
            use = criterion if stats is not None or not criterion.needs_calibration else magnitude
            fallback += use is not criterion
            pruned, _ = use.prune(view, sparsity, pattern, stats, norm)
            view.copy_(pruned)
        zeros[expert.name] = view.numel() - int(torch.count_nonzero(view))
    if fallback:
        log.info("layer %d: %d expert matrices pruned by magnitude (fewer than %d routed calibration tokens, "
                 "or no known activation for a down projection)", layer.index, fallback, MIN_EXPERT_TOKENS)


@dataclass
class CalibratedPruneStep:
    """The engine step for criteria that need activations (Wanda, SparseGPT)."""
    criterion: ModuleType
    targets: dict[str, float]
    pattern: Pattern
    norm: str
    acts: Activations
    true_sequential: bool = False
    every_expert: bool = False  # --moe-calibration all
    zeros: dict[str, int] = field(default_factory=dict)
    outside: OutsidePrune | None = None  # --prune-vision: the engine prunes the vision linears with it

    @torch.no_grad()
    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        module = layer.module()  # shares storage with layer.tensors: pruning in place updates both
        linears = {name: (lin, module.get_submodule(lin.name)) for lin, name in layer.linears()}
        todo = [n for n in linears if self.targets.get(n, 0.0) > 0]
        groups = input_groups(module, layer.index, self.acts, linears) if self.true_sequential else [todo]
        blocks = layer.layout.moe[layer.index] if any(self.targets.get(e.name, 0.0) > 0 for e, _ in layer.experts()) \
            else []
        routed = RoutedStats(self.criterion, self.every_expert)
        # Experts take their statistics in the pass of the (only) group, or in their own pass after
        # every linear group when pruning true-sequentially.
        together = blocks and not self.true_sequential
        for group in groups:
            group = {n: linears[n] for n in group if n in todo}
            with routed.collecting(module, blocks) if together else nullcontext():
                if not group:
                    if together:
                        self.acts.forward(module, layer.index)
                    continue
                stats = collect_stats(self.criterion, module, layer.index, self.acts, group)
            for name, (lin, sub) in group.items():
                weight = as_out_in(sub.weight, lin)
                pruned, _ = self.criterion.prune(weight, self.targets[name], self.pattern, stats.pop(name), self.norm)
                weight.copy_(pruned)
        if blocks and self.true_sequential:
            with routed.collecting(module, blocks):
                self.acts.forward(module, layer.index)
        prune_experts(layer, self.criterion, self.targets, self.pattern, self.norm, self.zeros, routed)
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
    """Target sparsity of every prunable matrix (with --prune-vision the vision linears too, after
    the decoder layers'), checked against the pattern."""
    matrices = prunable_matrices(source) + (vision_matrices(source) if cfg.prune_vision else [])
    rules = ratios.load_rules(cfg.ratios) if cfg.ratios and cfg.ratios != "owl" else None
    schedule = ratios.parse_schedule(cfg.schedule) if cfg.schedule else None
    uniform = cfg.sparsity if cfg.sparsity is not None else 0.0  # a structured mix: no per-matrix ratio
    targets = ratios.assign(matrices, uniform, rules, schedule, rules_source=f"ratio file {cfg.ratios}")
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
        fan_ins = [(name, source.checkpoint.spec(name).shape[0 if linear.transposed else 1])
                   for linear, name in source.layout.linear_names(index) if targets.get(name)]
        fan_ins += [(e.name, e.shape[1]) for e in source.layout.expert_matrices(index) if targets.get(e.name)]
        _check_fan_ins(fan_ins, pattern)
    _check_fan_ins([(name, source.checkpoint.spec(name).shape[0 if linear.transposed else 1])
                    for linear, name in source.layout.outside_linears() if targets.get(name)], pattern)


def _check_fan_ins(fan_ins: list[tuple[str, int]], pattern: Pattern) -> None:
    for name, fan_in in fan_ins:
        if fan_in % pattern.m:
            raise LlmpruneError(f"{name}: input dimension {fan_in} is not a multiple of M={pattern.m}")


@dataclass
class OutsidePrune:
    """``--prune-vision``: the linears outside the language model (a vision tower's, a projector's),
    pruned by magnitude one tensor at a time as the engine copies them (memory: one tensor).
    Calibration text reaches only the language model, so no calibrated criterion sees their inputs.
    Called as a step's ``outside(name, tensor)``; counts zeros into the step's own ``zeros``."""

    linears: dict[str, Linear]  # checkpoint weight name -> its linear
    targets: dict[str, float]
    pattern: Pattern
    norm: str
    zeros: dict[str, int]

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        linear = self.linears.get(name)
        if linear is None:
            return tensor
        sparsity = self.targets.get(name, 0.0)
        if sparsity > 0:
            pruned, _ = magnitude.prune(as_out_in(tensor, linear), sparsity, self.pattern, None, self.norm)
            tensor = pruned.t() if linear.transposed else pruned
        self.zeros[name] = tensor.numel() - int(torch.count_nonzero(tensor))
        return tensor


def outside_pruner(cfg: PruneConfig, source: Source, step: PruneStep | CalibratedPruneStep) -> OutsidePrune | None:
    """With --prune-vision, what prunes the vision linears for ``step`` (None without it); a calibrated
    method is named in a warning, since those linears are pruned by magnitude all the same."""
    if not cfg.prune_vision:
        return None
    linears = {name: linear for linear, name in source.layout.outside_linears()}
    if step.criterion.needs_calibration:
        parts = [p for p in source.layout.outside_language_model() if any(n.startswith(p + ".") for n in linears)]
        log.warning("--prune-vision: the %d linears of %s are pruned by magnitude, not %s: calibration text "
                    "reaches only the language model", len(linears), ", ".join(parts), cfg.method)
    return OutsidePrune(linears, step.targets, step.pattern, step.norm, step.zeros)


@dataclass
class PruneStep:
    """Prune every targeted matrix of a layer with one criterion; count the zeros written."""
    criterion: object
    targets: dict[str, float]
    pattern: Pattern
    norm: str
    zeros: dict[str, int] = field(default_factory=dict)
    outside: OutsidePrune | None = None  # --prune-vision: the engine prunes the vision linears with it

    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        out = dict(layer.tensors)
        for linear, name in layer.linears():
            sparsity = self.targets.get(name, 0.0)
            if sparsity > 0:
                weight = as_out_in(out[name], linear)
                pruned, _ = self.criterion.prune(weight, sparsity, self.pattern, None, self.norm)
                out[name] = pruned.t() if linear.transposed else pruned
            self.zeros[name] = out[name].numel() - int(torch.count_nonzero(out[name]))
        prune_experts(layer, self.criterion, self.targets, self.pattern, self.norm, self.zeros)
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

    With ``--ratios owl`` the targets are OWL's, from the journal when a resumed run has them (the
    vision linears of --prune-vision keep theirs). With --prune-vision the step prunes those too."""
    step, acts, calibrated = _make_step(cfg, source, device, store, targets, journal, progress, calib_ids)
    step.outside = outside_pruner(cfg, source, step)
    return step, acts, calibrated


def _make_step(cfg: PruneConfig, source: Source, device: torch.device, store: torch.device | Path,
               targets: dict[str, float], journal: resume.Journal, progress: bool,
               calib_ids: torch.Tensor | None) -> tuple[PruneStep | CalibratedPruneStep, Activations | None,
                                                        tuple[int, int] | None]:
    criterion = criteria.get(cfg.method)
    if cfg.method == "admm":
        criterion = criterion.Configured(cfg.admm_options())
    if not (criterion.needs_calibration or cfg.ratios == "owl"):
        return PruneStep(criterion, targets, cfg.parsed_pattern, cfg.norm), None, None
    outer, ids = calibration(cfg, source, device, store, calib_ids)
    if cfg.ratios == "owl":
        if journal.before.owl is None:
            owl, outliers = owl_targets(cfg, source, outer, ids, store, device, progress)
            journal.remember(owl={"targets": owl, "outlier_ratios": outliers})
        targets = {**targets, **journal.before.owl["targets"]}
    if not criterion.needs_calibration:
        return PruneStep(criterion, targets, cfg.parsed_pattern, cfg.norm), None, tuple(ids.shape)
    acts = Activations(outer, ids, calibration_batch(device, ids.shape[1]), store)
    step = CalibratedPruneStep(criterion, targets, cfg.parsed_pattern, cfg.norm, acts, cfg.true_sequential,
                               cfg.moe_calibration == "all")
    return step, acts, tuple(ids.shape)
