"""Calibration: the token windows, the model without its layers that turns them into the first
layer's inputs, and the statistics each linear's criterion gathers from its inputs as the states
pass through a layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from . import data
from .arch import Linear, ModelWithoutLayers, as_out_in
from .config import PruneConfig
from .errors import LlmpruneError
from .source import Source, capped_seqlen, check_routing
from .stream import Activations

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


def calibration_ids(cfg: PruneConfig, source: Source) -> torch.Tensor:
    """The calibration token windows (nsamples, seqlen), seqlen capped by the model's context."""
    ids = data.calibration_samples(source.tokenizer(), cfg.calib_data, cfg.nsamples, capped_seqlen(source, cfg.seqlen),
                                   cfg.seed, option="--calib-data")
    data.check_token_ids(ids, getattr(source.layout.config.get_text_config(), "vocab_size", None))
    return ids


def calibration(cfg: PruneConfig, source: Source, device: torch.device, store: torch.device | Path,
                ids: torch.Tensor | None = None) -> tuple[ModelWithoutLayers, torch.Tensor]:
    """The model's embeddings and head and the calibration token windows (``ids`` when given;
    states kept on ``store``)."""
    check_routing(source.layout)
    if ids is None:
        ids = calibration_ids(cfg, source)
    outer = ModelWithoutLayers(source.layout, source.checkpoint.read, device)
    log.info("calibration: %d windows of %d tokens from %s, states on %s", *ids.shape, cfg.calib_data, store)
    return outer, ids
