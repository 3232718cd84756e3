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
from types import ModuleType

import torch
from torch import nn

from .arch import Linear, as_out_in
from .criteria import wanda
from .errors import LlmpruneError
from .masks import Pattern
from .stream import Activations, Layer

log = logging.getLogger(__name__)


def _hooks(module: nn.Module, linears: dict[str, tuple[Linear, nn.Module]], fn) -> list:
    """Forward hooks calling ``fn(name, x)`` with each listed linear's input ``x`` (..., in)."""
    return [sub.register_forward_hook(lambda m, args, out, name=name: fn(name, args[0]))
            for name, (_, sub) in linears.items()]


def input_groups(module: nn.Module, index: int, acts: Activations,
                 linears: dict[str, tuple[Linear, nn.Module]]) -> list[list[str]]:
    """The layer's linears in execution order, grouped by shared input (q/k/v read one tensor)."""
    # The input tensors themselves are kept, and compared by identity: an address alone can be
    # reused by the allocator for a later input once the earlier one is freed.
    seen: list[tuple[str, torch.Tensor]] = []
    handles = _hooks(module, linears, lambda name, x: seen.append((name, x)))
    try:
        acts.forward(module, index, chunks=1)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, x in seen:
        if any(name in g for g in groups):
            continue
        if groups and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups


def collect_stats(criterion: ModuleType, module: nn.Module, index: int, acts: Activations,
                  linears: dict[str, tuple[Linear, nn.Module]]) -> dict[str, object]:
    """Run the calibration states through the layer, accumulating each linear's statistics.

    Linears called one after another on the same input tensor (q, k and v; gate and up) share one
    statistics object, accumulated once: the same numbers, and for SparseGPT one Hessian and one
    factorisation instead of three. The sharing is decided on the first chunk and checked on every
    later one.
    """
    stats: dict[str, object] = {}
    leader: dict[str, str] = {}  # linear -> the linear whose statistics it shares (itself if none)
    last: list = [None, None]  # input tensor and linear of the previous hook call

    def hook(name: str, x: torch.Tensor) -> None:
        prev_x, prev = last
        same = prev is not None and prev_x is x
        if name not in leader:
            lin, sub = linears[name]
            shared = same and as_out_in(sub.weight, lin).shape[1] == as_out_in(linears[prev][1].weight, linears[prev][0]).shape[1]
            leader[name] = leader[prev] if shared else name
            if not shared:
                stats[name] = criterion.init_stats(as_out_in(sub.weight, lin))
        elif leader[name] != name and not (same and leader[prev] == leader[name]):
            raise LlmpruneError(f"layer {index}: {name} read the input of {leader[name]} on the first calibration "
                                "chunk but not on a later one")
        if leader[name] == name:
            criterion.accumulate(stats[name], x.reshape(-1, x.shape[-1]))
        last[:] = [x, name]

    handles = _hooks(module, linears, hook)
    try:
        acts.forward(module, index)
    finally:
        for h in handles:
            h.remove()
        last[:] = [None, None]
    for name, (lin, sub) in linears.items():  # a linear the forward never reached: empty statistics
        if name not in leader:
            leader[name] = name
            stats[name] = criterion.init_stats(as_out_in(sub.weight, lin))
    return {name: stats[leader[name]] for name in linears}


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
