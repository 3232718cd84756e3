"""Several structured kinds in one run, and the mix chosen for a parameter target.

``--pattern channels=0.2,heads=0.34,layers=0.1`` removes the given share of each kind in one pass:
whole layers are dropped (lowest block influence, as ``--pattern layers``), and in every kept layer
the query heads and then the MLP channels are ranked and removed as their own patterns do, each
readout re-fitted, the states moving on through the layer as the output model computes it.

``--target-params 0.8`` (or ``1.5B``) chooses the shares. One read-only pass over the dense model on
the calibration data measures, for every decoder layer, the damage each removal would do: the error it
injects into the residual stream, token by token relative to that token's squared residual norm
leaving the last layer (what the final norm divides by), averaged over the tokens,
mean_t ||e_t||^2 / ||h_L,t||^2; a first pass finds those norms. Per token, because a few tokens (the
first, an attention sink) carry norms tens of times the others', so a ratio of sums is theirs alone;
against the final norm, because an error injected early rides the residual stream to the end, while
the stream's norm grows through the layers (relative to the local norm the first layers' errors look
far costlier than they are: on SmolLM2 layer 0 changes its input by 305 times that input's energy). On SmolLM2 the ratio of sums dropped 4 middle
layers for 90% of the parameters (38.3 perplexity against 27.9 for channels alone at 88%). For
channels and heads the error is the readout's output error once the lowest-ranked units are gone
and the rest re-fitted by least squares (each token's readout input scaled by 1 / ||h_L,t||; at a
grid of counts, interpolated between), for a whole layer ||h_out - h_in||^2. The
search then takes, among every mix of uniform counts (the same number of channels and heads in every
kept layer, as transformers' configs require) whose parameter count lies within 1% of the target,
the one with the least summed damage. The plan, its predicted damage and the best single-kind plans
are printed and recorded.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import masks, reconstruct
from .checkpoint import TensorSpec
from .config import PruneConfig, parse_param_target
from .errors import LlmpruneError
from .source import Source
from .stream import Activations, Layer
from .stream import layers as stream_layers
from .stream import output_specs
from .structured import (
    UNIT_NAMES,
    UNIT_SCORES,
    InfluenceStep,
    Shrink,
    UnitStep,
    _calibrated_activations,
    readout_view,
    reduced_shape,
    removal_count,
    unit_columns,
    unit_scores,
)
from .units import Units, check_expressible, renumbered, shrunk_config_values, units_of, without_layers

log = logging.getLogger(__name__)

TOLERANCE = 0.01  # a target plan's parameter count lies within 1% of the target
GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # unit fractions measured when a block is large
ORDER = ("kv-heads", "heads", "channels")  # within a layer: attention before the MLP that reads its output


@dataclass
class MixStep:
    """Engine step of a mix: dropped layers write nothing (their states pass unchanged, as the
    output model skips them); in kept layers each unit kind's ``UnitStep`` runs in turn on the same
    tensors (the last one moves the states on) and the layer is renumbered."""

    layout: object
    parts: list[UnitStep]
    dropped: set[int]
    zeros: dict[str, int] = field(default_factory=dict)

    @property
    def acts(self) -> Activations | None:
        return next((p.acts for p in self.parts if p.acts is not None), None)

    def new_index(self, index: int) -> int:
        return index - sum(1 for d in self.dropped if d < index)

    def layer_state(self, index: int) -> dict[str, list[int]] | None:
        return None if index in self.dropped else {p.units[index].kind: p.removed[index] for p in self.parts}

    def restore_layer_state(self, index: int, state: dict[str, list[int]] | None) -> None:
        for part in self.parts:
            if state is not None:
                part.restore_layer_state(index, state[part.units[index].kind])

    @torch.no_grad()
    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        if layer.index in self.dropped:
            for _, name in layer.linears():
                self.zeros[name] = layer.tensors[name].numel()
            return {}
        sizes = {name: layer.tensors[name].numel() for _, name in layer.linears()}
        out = dict(layer.tensors)
        for part in self.parts:
            result = part(layer)
            for name in part.names(layer.index).values():
                out[name] = result[name]
        for name, size in sizes.items():
            self.zeros[name] = size - out[name].numel()
        return {renumbered(self.layout, n, self.new_index(layer.index)): t for n, t in out.items()}


@dataclass
class MixShrink(Shrink):
    """A planned mix: the ``Shrink`` interface (output specs, config, summary) over a ``MixStep``."""
    mix: dict = field(default_factory=dict)  # per kind: units removed per block, of how many; layers dropped
    search: dict | None = None  # for a parameter target: the target, the predicted damage, alternatives

    def layer_state(self, index: int) -> dict[str, list[int]] | None:
        return self.step.layer_state(index)

    def restore_layer_state(self, index: int, state: dict[str, list[int]] | None) -> None:
        self.step.restore_layer_state(index, state)

    def spec(self, spec: TensorSpec) -> TensorSpec | None:
        index = self.layout.layer_of(spec.name)
        if index is None:
            return spec
        if index in self.step.dropped:
            return None
        rel = self.layout.model_name(spec.name)[len(self.layout.layer_prefix(index)):]
        shape = tuple(spec.shape)
        for part in self.step.parts:
            shape = reduced_shape(part.units[index], rel, shape, part.remove)
        return TensorSpec(renumbered(self.layout, spec.name, self.step.new_index(index)), spec.dtype, shape)

    def decision(self) -> dict:
        """What a resumed run must not decide again (kept in the journal)."""
        return {"counts": {p.units[0].kind: p.remove for p in self.step.parts}, "dropped": sorted(self.step.dropped),
                "search": self.search, "influence": self.influence}

    def summary(self, specs_in: list[TensorSpec], specs_out: list[TensorSpec]) -> dict:
        out = self.common_summary(specs_in, specs_out)
        out["mix"] = self.mix
        out["description"] = describe(self.mix)
        out["removed"] = {"layers": sorted(self.step.dropped),
                          **{p.units[0].kind: {str(i): r for i, r in p.removed.items()}
                             for p in self.step.parts if p.units[0].kind != "channels"}}
        if self.influence is not None:
            out["block_influence"] = self.influence
        if self.search is not None:
            out["search"] = self.search
        return out


def plan(cfg: PruneConfig, source: Source, device: torch.device, progress: bool = True,
         before: dict | None = None) -> MixShrink:
    """The mix of ``cfg`` (given ratios, or chosen for ``cfg.target_params``); ``before``: what a
    resumed run decided already (the counts, dropped layers and search record)."""
    layout = source.layout
    kinds = [k for k in ORDER if k in cfg.mix_kinds]
    units = {k: [units_of(layout, i, k) for i in range(layout.num_layers)] for k in kinds}
    for kind, per_layer in units.items():
        if len({(u.blocks, u.per_block) for u in per_layer}) != 1:
            raise LlmpruneError(f"--pattern {kind}: decoder layers differ in their number of units")
    calibrated = cfg.method in UNIT_SCORES
    influence, search = None, None
    if before is not None:
        counts = {k: before["counts"].get(k, 0) for k in kinds}
        dropped, search, influence = set(before["dropped"]), before["search"], before["influence"]
    elif cfg.target_params is not None:
        damage = measure(cfg, source, device, units, progress)
        counts, dropped, search = choose(cfg, source, units, damage)
    else:
        ratios = dict(cfg.parsed_pattern.parts)
        counts = {k: removal_count(k, units[k][0].per_block, ratios[k]) for k in kinds}
        dropped = set()
        if "layers" in ratios:
            remove = removal_count("layers", layout.num_layers, ratios["layers"])
            step = InfluenceStep(_calibrated_activations(cfg, source, device))
            for layer in stream_layers(source.checkpoint, layout, device, desc="block influence", progress=progress):
                step(layer)
            influence = step.scores
            scores = torch.tensor(influence, dtype=torch.float64)
            dropped = set(torch.nonzero(~masks.units(scores[None], remove)[0]).squeeze(1).tolist())
    kept = [i for i in range(layout.num_layers) if i not in dropped]
    values: dict[str, object] = without_layers(layout, dropped) if dropped else {}
    for kind in kinds:
        values.update(shrunk_config_values(layout, units[kind][0], units[kind][0].per_block - counts[kind]))
    shapes = {}
    for new, old in enumerate(kept):
        planned = {}
        for name, p in layout.layer_module(old).named_parameters():
            shape = tuple(p.shape)
            for kind in kinds:
                shape = reduced_shape(units[kind][old], name, shape, counts[kind])
            planned[name] = shape
        shapes[new] = planned
    check_expressible(layout, values, shapes)
    active = [k for k in kinds if counts[k]]
    acts = _calibrated_activations(cfg, source, device) if calibrated and active else None
    parts = [UnitStep(layout, units[k], counts[k], cfg.norm, acts, cfg.method, cfg.reconstruct and acts is not None,
                      advance=k == active[-1]) for k in active]
    importance = (f"{UNIT_SCORES[cfg.method]} on calibration data ({cfg.method})" if acts is not None
                  else f"{cfg.norm} norm of the unit's weights")
    if acts is not None and cfg.reconstruct:
        importance += "; kept readout columns re-fitted by least squares"
    if dropped:
        importance += ("; layers by their damage on calibration data" if search is not None
                       else "; layers by block influence (1 - mean cosine of hidden states in and out)")
    mix = {k: {"removed_per_block": counts[k], "of": units[k][0].per_block, "blocks": units[k][0].blocks}
           for k in kinds}
    if "layers" in cfg.mix_kinds:
        mix["layers"] = {"removed": len(dropped), "of": layout.num_layers}
    text = layout.config.get_text_config()
    log.info("mix: %s (%s)", describe(mix), importance)
    shrink = MixShrink(layout, "mix", 0.0, MixStep(layout, parts, dropped), values,
                       {k: getattr(text, k, None) for k in values}, importance,
                       influence=influence, calibration=(acts.windows if acts is not None else None),
                       mix=mix, search=search)
    specs = output_specs(source.checkpoint, layout, None)
    dense = sum(math.prod(s.shape) for s in specs)
    shrink.ratio = 1 - sum(math.prod(s.shape) for s in shrink.specs(specs)) / dense  # share of parameters removed
    return shrink


def describe(mix: dict) -> str:
    """``mix`` in words: "2 of 3 query heads per KV group, 264 of 1536 MLP channels, 3 of 30 layers"."""
    words = []
    for kind, m in mix.items():
        if kind == "layers":
            words.append(f"{m['removed']} of {m['of']} decoder layers")
        else:
            words.append(f"{m['removed_per_block']} of {m['of']} {UNIT_NAMES[kind]}")
    return ", ".join(words)


# --- the damage of each removal, measured on the dense model ------------------------------------


@dataclass
class Damage:
    """Per decoder layer: each unit kind's damage at the counts in ``grid`` (removed per block) and
    the damage of dropping the whole layer; all relative to the residual stream's energy there."""
    grid: dict[str, list[int]]
    units: dict[str, list[list[float]]]  # kind -> layer -> damage at each grid count
    layers: list[float]

    def at(self, kind: str, index: int, count: int) -> float:
        """Damage of removing ``count`` units per block of ``kind`` in layer ``index``, linear
        between the measured counts."""
        xs, ys = [0, *self.grid[kind]], [0.0, *self.units[kind][index]]
        if count >= xs[-1]:
            return ys[-1] * count / xs[-1]
        j = next(j for j in range(1, len(xs)) if count <= xs[j])
        t = (count - xs[j - 1]) / (xs[j] - xs[j - 1])
        return ys[j - 1] + t * (ys[j] - ys[j - 1])


def grid_counts(per_block: int) -> list[int]:
    """The counts (units per block) whose damage is measured: all of them for a small block."""
    if per_block <= 16:
        return list(range(1, per_block))
    return sorted({min(per_block - 1, max(1, round(f * per_block))) for f in GRID})


@dataclass
class DamageStep:
    """Read-only pass: each layer's removal damages on the dense states, then the states move on."""
    acts: Activations
    units: dict[str, list[Units]]
    score: str
    refitted: bool
    grid: dict[str, list[int]]
    final: list[torch.Tensor]  # per chunk (B, T, 1): 1 / ||h_t|| of each token's residual leaving the last layer
    damage: dict[str, list[list[float]]] = field(default_factory=dict)
    layers: list[float] = field(default_factory=list)

    def weight(self, chunk: int, device: torch.device) -> torch.Tensor:
        return self.final[chunk].to(device)

    @torch.no_grad()
    def __call__(self, layer: Layer) -> None:
        module = layer.module()
        moments, handles = {}, []
        in_flight = [-1]  # the chunk the layer is running on (chunks run in order)

        def count(mod, args, kwargs):
            in_flight[0] += 1

        handles.append(module.register_forward_pre_hook(count, with_kwargs=True))
        for kind, per_layer in self.units.items():
            readout = per_layer[layer.index].readout
            m = reconstruct.InputMoments(readout.owner.shape[0], device=self.acts.device)
            moments[kind] = m
            handles.append(module.get_submodule(readout.name.rsplit(".", 1)[0]).register_forward_hook(
                lambda mod, args, out, m=m: m.add(args[0].float() * self.weight(in_flight[0], args[0].device))))
        before = self.acts.snapshot()
        try:
            self.acts.advance(module, layer.index)
        finally:
            for h in handles:
                h.remove()
        drift = 0.0
        for i, a in enumerate(before):
            b = self.acts.chunk(i).float()
            a = (torch.load(a, weights_only=True) if isinstance(a, Path) else a).to(b.device, torch.float32)
            drift += float(((b - a) * self.weight(i, b.device)).square().sum(dtype=torch.float64))
            if isinstance(before[i], Path):
                before[i].unlink()
        self.layers.append(drift / self.acts.tokens)
        names = {o.name: layer.layout.checkpoint_name(layer.layout.layer_prefix(layer.index) + o.name)
                 for per_layer in self.units.values() for o in per_layer[layer.index].tensors}
        for kind, per_layer in self.units.items():
            units = per_layer[layer.index]
            weight = readout_view(layer.tensors[names[units.readout.name]], units.readout)
            columns = unit_columns(units.readout, units.count)
            scores = unit_scores(self.score, weight, moments[kind], columns)
            row = []
            for count in self.grid[kind]:
                keep = masks.units(scores.view(units.blocks, units.per_block), count).reshape(-1)
                owner = units.readout.owner
                kept = torch.nonzero((owner < 0) | keep.to(owner.device)[owner.clamp(min=0)]).squeeze(1)
                row.append(reconstruct.removal_error(weight, moments[kind], kept, self.refitted))
            self.damage.setdefault(kind, []).append(row)


def measure(cfg: PruneConfig, source: Source, device: torch.device, units: dict[str, list[Units]],
            progress: bool) -> Damage:
    """Two read-only passes over the dense model: each token's residual norm at the end, then every
    layer's removal damages relative to it."""
    grid = {k: grid_counts(u[0].per_block) for k, u in units.items()}
    acts = _calibrated_activations(cfg, source, device)
    with torch.no_grad():  # else autograd keeps every layer's activations alive
        for layer in stream_layers(source.checkpoint, source.layout, device, desc="final norms", progress=progress):
            acts.advance(layer.module(), layer.index)
    final = [acts.chunk(i).float().norm(dim=-1, keepdim=True).clamp_min(1e-6).reciprocal().cpu()
             for i in range(len(acts.hidden))]
    del acts
    step = DamageStep(_calibrated_activations(cfg, source, device), units, cfg.method, cfg.reconstruct, grid, final)
    for layer in stream_layers(source.checkpoint, source.layout, device, desc="damage", progress=progress):
        step(layer)
    return Damage(grid, step.damage, step.layers)


# --- the search -----------------------------------------------------------------------------------


def unit_params(layout, units: Units, index: int) -> int:
    """Parameters one unit of ``units`` holds in layer ``index`` (over every tensor it owns)."""
    shapes = {n: tuple(p.shape) for n, p in layout.layer_module(index).named_parameters()}
    total = 0
    for owned in units.tensors:
        shape = shapes[owned.name]
        positions = int((owned.owner >= 0).sum()) // units.count
        total += positions * math.prod(shape) // shape[owned.dim]
    return total


def choose(cfg: PruneConfig, source: Source, units: dict[str, list[Units]],
           damage: Damage) -> tuple[dict[str, int], set[int], dict]:
    """The mix of uniform counts at most the target and within 1% of it with the least summed damage."""
    layout = source.layout
    specs = output_specs(source.checkpoint, layout, None)
    dense = sum(math.prod(s.shape) for s in specs)
    fraction, count = parse_param_target(cfg.target_params)
    target = round(fraction * dense) if fraction is not None else count
    if target >= dense:
        raise LlmpruneError(f"--target-params {cfg.target_params} asks for {target:,} parameters; the input has "
                            f"{dense:,} already")
    per_layer = [0] * layout.num_layers
    for s in specs:
        index = layout.layer_of(s.name)
        if index is not None:
            per_layer[index] += math.prod(s.shape)
    cost = {k: [unit_params(layout, u[i], i) * u[i].blocks for i in range(layout.num_layers)]
            for k, u in units.items()}  # parameters per unit removed from every block
    kinds = list(units)
    free = [k for k in kinds if k != "channels"]  # few counts each: enumerated
    by_damage = sorted(range(layout.num_layers), key=lambda i: (damage.layers[i], i))
    max_drop = layout.num_layers - 1 if "layers" in cfg.mix_kinds else 0
    low, high = target * (1 - TOLERANCE), target  # a budget: at most the target, and within 1% of it
    plans = []
    for drop in range(max_drop + 1):
        dropped = set(by_damage[:drop])
        kept = [i for i in range(layout.num_layers) if i not in dropped]
        base = dense - sum(per_layer[i] for i in dropped)
        base_damage = sum(damage.layers[i] for i in dropped)
        for combo in itertools.product(*[range(units[k][0].per_block) for k in free]):
            counts = dict(zip(free, combo))
            params = base - sum(n * cost[k][i] for k, n in counts.items() for i in kept)
            hurt = base_damage + sum(damage.at(k, i, n) for k, n in counts.items() for i in kept)
            if "channels" in units:
                per = sum(cost["channels"][i] for i in kept)
                need = max(0, math.ceil((params - high) / per)) if per else 0
                if need >= units["channels"][0].per_block:
                    continue
                counts["channels"] = need
                params -= need * per
                hurt += sum(damage.at("channels", i, need) for i in kept)
            if low <= params <= high:
                plans.append((hurt, drop, counts, sorted(dropped), params))
    if not plans:
        smallest = dense - sum(per_layer[i] for i in by_damage[:max_drop]) - sum(
            (units[k][0].per_block - 1) * cost[k][i] for k in kinds for i in by_damage[max_drop:])
        raise LlmpruneError(f"--target-params {cfg.target_params} ({target:,} of {dense:,} parameters) cannot be met "
                            f"within 1% by removing {', '.join(cfg.mix_kinds)} uniformly (they reach down to "
                            f"{smallest:,}, {smallest / dense:.1%}): choose another target or allow more kinds "
                            "with --pattern")
    plans.sort(key=lambda p: (p[0], p[1], sorted(p[2].items())))
    hurt, _, counts, dropped, params = plans[0]

    def record(p) -> dict:
        return {"damage": p[0], "parameters": p[4], "counts": p[2], "layers_dropped": p[3]}

    alone = {}
    for kind in cfg.mix_kinds:
        only = [p for p in plans if (kind == "layers" or p[1] == 0)
                and all(n == 0 for k, n in p[2].items() if k != kind) and (kind != "layers" or p[1] > 0)]
        if only:
            alone[kind] = record(only[0])
    search = {"target": target, "dense": dense, "tolerance": TOLERANCE, "chosen": record(plans[0]),
              "single_kind": alone, "plans_considered": len(plans),
              "damage": "mean squared error injected into the residual stream per token, relative to its energy, "
                        "summed over layers",
              "grid": damage.grid, "layer_damage": damage.layers}
    log.info("target %s: %d plans within 1%% of %s parameters; chosen damage %.4g (%s)", cfg.target_params,
             len(plans), f"{target:,}", hurt, ", ".join(f"{k} alone {v['damage']:.4g}" for k, v in alone.items()))
    return {k: counts.get(k, 0) for k in kinds}, set(dropped), search
