"""Structured pruning: remove whole units, so the output is a smaller dense model.

``--pattern channels`` removes MLP intermediate channels, ``heads`` query heads (the same number in
every KV group), ``kv-heads`` whole KV groups with their query heads, ``layers`` whole decoder layers.
transformers' configs hold one intermediate size and one head count for all layers, so the ratio of
channels and heads is uniform across layers; the output's shapes are therefore known before any
layer is scored, and the shard layout is planned up front as for unstructured pruning. Which units
go is decided per layer as the engine streams it:

- ``magnitude``: the ``--norm`` (l1 or l2) of the unit's weights: its rows of the input linears and
  its columns of the output linear;
- ``wanda``: the unit's output norm on the calibration data, ||W_u X_u|| over all tokens, W_u being
  the output linear's columns of the unit and X_u the unit's activations entering it; computed from
  each unit's input Gram matrix (tokens never stored). States propagate through the pruned layers.

Layers are ranked by block influence (ShortGPT): 1 - the mean cosine similarity of each token's
hidden state entering and leaving the layer, on the calibration data, in one read-only pass over the
dense model before writing; the lowest go, and the kept layers are renumbered.

``experts`` removes routed experts of mixture-of-experts layers (``expert_removal``).

``hidden`` removes dimensions of the residual stream (``llmprune.hidden`` scores them and plans the
run; ``HiddenStep`` here writes the sliced tensors, the ones outside the layers included).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import expert_removal, masks, reconstruct
from .arch import Layout
from .calibrate import calibration
from .checkpoint import TensorSpec
from .config import PruneConfig
from .errors import LlmpruneError
from .expert_removal import ExpertStep
from .sizing import calibration_batch, calibration_store
from .source import Source
from .stream import Activations, Layer
from .stream import layers as stream_layers
from .units import (
    Owned,
    Residual,
    Units,
    check_expressible,
    edit_config_json,
    renumbered,
    shrunk_config_values,
    units_of,
    without_layers,
)

log = logging.getLogger(__name__)


UNIT_SCORES = {"wanda": "output energy ||W_u X_u||^2", "sparsegpt": "OBS removal cost after re-fitting the rest",
               "flap": "fluctuation var(x_u) ||W_u||^2 (FLAP)"}
UNIT_NAMES = {"channels": "MLP channels", "heads": "query heads per KV group", "kv-heads": "KV groups",
              "layers": "decoder layers", "experts": "routed experts per MoE layer", "hidden": "hidden dimensions"}


def unit_norms(tensors: dict[str, torch.Tensor], units: Units, names: dict[str, str], norm: str) -> torch.Tensor:
    """The ``norm`` of each unit's weights over all the tensors it owns, (units,) float32."""
    total = None
    for owned in units.tensors:
        if not owned.name.endswith("weight"):
            continue
        t = tensors[names[owned.name]]
        rows = t.float().movedim(owned.dim, 0).reshape(t.shape[owned.dim], -1)  # (positions, rest)
        per_position = rows.abs().sum(1) if norm == "l1" else rows.square().sum(1)
        if total is None:
            total = torch.zeros(units.count, dtype=torch.float32, device=t.device)
        mine = owned.owner >= 0
        total.index_add_(0, owned.owner[mine].to(t.device), per_position[mine.to(t.device)])
    return total if norm == "l1" else total.sqrt()


def unit_columns(readout: Owned, count: int) -> torch.Tensor:
    """(units, width) positions of each unit along the readout's input dimension."""
    mine = torch.nonzero(readout.owner >= 0).squeeze(1)
    order = mine[torch.argsort(readout.owner[mine], stable=True)]
    return order.view(count, -1)


@dataclass
class UnitStep:
    """Engine step for channels and heads: score each layer's units, remove the lowest, slice.

    With calibration states (``acts``), the readout's input moments are gathered as the states pass
    through the layer; units are ranked by their output energy ||W_u X_u||^2 (``wanda``) or by their
    OBS removal cost (``sparsegpt``: the rise in the readout's squared error when the unit goes and
    the rest are re-fitted), and with ``reconstruct`` the readout's kept columns are re-fitted by least
    squares to the dense output (``reconstruct.refit``) before the states move on.
    """

    layout: Layout
    units: list[Units]
    remove: int  # units removed per block
    norm: str
    acts: Activations | None = None  # set for calibrated ranking
    score: str = "wanda"  # with acts: wanda (output energy), sparsegpt (OBS removal cost) or flap (fluctuation)
    reconstruct: bool = False
    advance: bool = True  # move the states on past the layer (False: a later step of the same layer does)
    removed: dict[int, list[int]] = field(default_factory=dict)
    zeros: dict[str, int] = field(default_factory=dict)  # elements removed per prunable matrix

    def layer_state(self, index: int) -> list[int]:
        """What a resumed run needs of layer ``index``: the units removed there."""
        return self.removed[index]

    def restore_layer_state(self, index: int, removed: list[int]) -> None:
        self.removed[index] = removed

    def names(self, index: int) -> dict[str, str]:
        prefix = self.layout.layer_prefix(index)
        return {o.name: self.layout.checkpoint_name(prefix + o.name) for o in self.units[index].tensors}

    @torch.no_grad()
    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        units, names = self.units[layer.index], self.names(layer.index)
        module = layer.module() if self.acts is not None else None  # shares storage with layer.tensors
        if module is None:
            scores = unit_norms(layer.tensors, units, names, self.norm)
        else:
            readout = readout_view(layer.tensors[names[units.readout.name]], units.readout)  # (out, in) view
            columns = unit_columns(units.readout, units.count)  # (units, w)
            moments = self.readout_moments(module, layer.index, units)
            scores = unit_scores(self.score, readout, moments, columns)
        keep = masks.units(scores.view(units.blocks, units.per_block), self.remove).reshape(-1).cpu()
        self.removed[layer.index] = torch.nonzero(~keep).squeeze(1).tolist()
        if module is not None and self.reconstruct:
            kept = torch.nonzero((units.readout.owner < 0) | keep[units.readout.owner.clamp(min=0)]).squeeze(1)
            readout[:, kept.to(readout.device)] = reconstruct.refit(readout, moments, kept)
        out = dict(layer.tensors)
        for owned in units.tensors:
            name = names[owned.name]
            kept = torch.nonzero((owned.owner < 0) | keep[owned.owner.clamp(min=0)]).squeeze(1)
            if module is not None:  # the next layer's inputs come from this layer without its units
                gone = torch.nonzero((owned.owner >= 0) & ~keep[owned.owner.clamp(min=0)]).squeeze(1)
                layer.tensors[name].index_fill_(owned.dim, gone.to(layer.tensors[name].device), 0)
            out[name] = layer.tensors[name].index_select(owned.dim, kept.to(layer.tensors[name].device))
        if module is not None and self.advance:
            self.acts.advance(module, layer.index)
        for _, name in layer.linears():
            self.zeros[name] = layer.tensors[name].numel() - out[name].numel()
        return out

    def readout_moments(self, module: torch.nn.Module, index: int, units: Units) -> reconstruct.InputMoments:
        """The readout linear's input moments over every calibration token of this layer."""
        readout = module.get_submodule(units.readout.name.rsplit(".", 1)[0])
        moments = reconstruct.InputMoments(units.readout.owner.shape[0], device=self.acts.device)
        handle = readout.register_forward_hook(lambda m, args, out: moments.add(args[0]))
        try:
            self.acts.forward(module, index)
        finally:
            handle.remove()
        return moments


def unit_scores(score: str, readout: torch.Tensor, moments: reconstruct.InputMoments,
                columns: torch.Tensor) -> torch.Tensor:
    """Each unit's calibrated score under ``score`` (a key of ``UNIT_SCORES``): (units,), lowest goes first."""
    if score == "sparsegpt":
        return reconstruct.obs_costs(readout, moments, columns)
    if score == "flap":
        return reconstruct.fluctuation(readout, moments, columns)
    return reconstruct.output_energy(readout, moments, columns)


def readout_view(tensor: torch.Tensor, readout: Owned) -> torch.Tensor:
    """The readout weight as (out, in), sharing storage (GPT-2's Conv1D stores it transposed)."""
    return tensor if readout.dim == 1 else tensor.t()


@dataclass
class LayerDropStep:
    """Engine step for ``layers``: dropped layers write nothing, kept ones are renumbered."""
    layout: Layout
    dropped: set[int]
    zeros: dict[str, int] = field(default_factory=dict)

    def new_index(self, index: int) -> int:
        return index - sum(1 for d in self.dropped if d < index)

    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        for _, name in layer.linears():
            self.zeros[name] = layer.tensors[name].numel() if layer.index in self.dropped else 0
        if layer.index in self.dropped:
            return {}
        return {renumbered(self.layout, n, self.new_index(layer.index)): t for n, t in layer.tensors.items()}


@dataclass
class InfluenceStep:
    """Read-only pass: block influence of each dense layer, 1 - mean cos(h_in, h_out) over tokens."""
    acts: Activations
    scores: list[float] = field(default_factory=list)

    @torch.no_grad()
    def __call__(self, layer: Layer) -> None:
        before = self.acts.hidden
        self.acts.advance(layer.module(), layer.index)
        cos = sum(float(F.cosine_similarity(a.float(), b.float(), dim=-1).sum(dtype=torch.float64))
                  for a, b in zip(before, self.acts.hidden))
        self.scores.append(1.0 - cos / self.acts.tokens)


@dataclass
class HiddenStep:
    """Engine step for ``hidden``: every tensor along the residual width keeps the dimensions ``kept``
    (sorted), norm weights and the embedding multiplied by their ``factors`` (model name -> factor;
    a norm of 1 + w keeps (1 + w) * factor - 1). The tensors outside the layers go through ``outside``."""
    layout: Layout
    residual: Residual
    kept: torch.Tensor  # (kept,) int64
    factors: dict[str, float]
    zeros: dict[str, int] = field(default_factory=dict)

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.residual.shape(self.layout.model_name(name), shape, len(self.kept))

    def outside(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.sliced(name, tensor)

    def sliced(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Checkpoint tensor ``name`` without the removed dimensions (unchanged when not along the width)."""
        model_name = self.layout.model_name(name)
        entry = self.residual.dims.get(model_name)
        if entry is None:
            return tensor
        out = tensor.index_select(entry[0], self.kept.to(tensor.device))
        factor = self.factors.get(model_name)
        if factor is not None:
            offset = self.residual.offsets.get(model_name, 0.0)
            out = ((out.float() + offset) * factor - offset).to(tensor.dtype)
        return out

    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        out = {name: self.sliced(name, t) for name, t in layer.tensors.items()}
        for _, name in layer.linears():
            self.zeros[name] = layer.tensors[name].numel() - out[name].numel()
        return out


def removal_count(kind: str, per_block: int, ratio: float) -> int:
    """Units removed per block at ``ratio``; refuses removing none or all."""
    k = masks.prune_count(per_block, ratio)
    what = UNIT_NAMES[kind]
    if k == 0:
        raise LlmpruneError(f"--sparsity {ratio} removes none of the {per_block} {what}: "
                            f"the smallest ratio that removes one is {0.5 / per_block:.4g}")
    if k >= per_block:
        raise LlmpruneError(f"--sparsity {ratio} would remove all {per_block} {what}; "
                            f"at most {(per_block - 0.5) / per_block:.4g} keeps one")
    return k


@dataclass
class Shrink:
    """A planned structured prune: the engine step, the output's tensor specs and config."""
    layout: Layout
    kind: str
    ratio: float
    step: UnitStep | LayerDropStep | ExpertStep | HiddenStep
    values: dict[str, object]  # config attributes of the output (canonical names)
    before: dict[str, object]
    importance: str
    influence: list[float] | None = None  # the first pass's scores: per layer (layers), per dimension (hidden)
    calibration: tuple[int, int] | None = None  # (windows, tokens) of the calibration data it used

    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        return self.step(layer)

    def outside(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The output of checkpoint tensor ``name`` outside the decoder layers (sliced for hidden)."""
        return self.step.outside(name, tensor) if isinstance(self.step, HiddenStep) else tensor

    @property
    def zeros(self) -> dict[str, int]:
        return self.step.zeros

    @property
    def acts(self) -> Activations | None:
        """The calibration states the step propagates (wanda units), for the resume journal."""
        return getattr(self.step, "acts", None)

    def layer_state(self, index: int) -> list[int] | dict | None:
        return self.step.layer_state(index) if isinstance(self.step, (UnitStep, ExpertStep)) else None

    def restore_layer_state(self, index: int, state: list[int]) -> None:
        self.step.restore_layer_state(index, state)

    def output_name(self, spec: TensorSpec) -> str | None:
        out = self.spec(spec)
        return None if out is None else out.name

    def spec(self, spec: TensorSpec) -> TensorSpec | None:
        """The output spec of an input tensor: reduced, renumbered, or None when it is dropped."""
        if isinstance(self.step, HiddenStep):
            return TensorSpec(spec.name, spec.dtype, self.step.shape(spec.name, spec.shape))
        index = self.layout.layer_of(spec.name)
        if index is None:
            return spec
        if isinstance(self.step, ExpertStep):
            return self.step.spec(index, spec)
        if isinstance(self.step, LayerDropStep):
            if index in self.step.dropped:
                return None
            return TensorSpec(renumbered(self.layout, spec.name, self.step.new_index(index)), spec.dtype, spec.shape)
        rel = self.layout.model_name(spec.name)[len(self.layout.layer_prefix(index)):]
        return TensorSpec(spec.name, spec.dtype, reduced_shape(self.step.units[index], rel, spec.shape,
                                                               self.step.remove))

    def specs(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        return [out for s in specs if (out := self.spec(s)) is not None]

    def write_config(self, folder: Path) -> None:
        path = folder / "config.json"
        data = edit_config_json(self.layout.config, json.loads(path.read_text()), self.values)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def common_summary(self, specs_in: list[TensorSpec], specs_out: list[TensorSpec]) -> dict:
        """llmprune.json's "structured" keys every kind shares: pattern, ratio, importance, config, parameters."""
        return {
            "pattern": self.kind, "ratio": self.ratio, "importance": self.importance,
            "config": {k: {"before": self.before.get(k), "after": v} for k, v in self.values.items()},
            "parameters": {"before": sum(math.prod(s.shape) for s in specs_in),
                           "after": sum(math.prod(s.shape) for s in specs_out)},
        }

    def summary(self, specs_in: list[TensorSpec], specs_out: list[TensorSpec]) -> dict:
        out = self.common_summary(specs_in, specs_out)
        if isinstance(self.step, LayerDropStep):
            out["removed"] = sorted(self.step.dropped)
            out["block_influence"] = self.influence
        elif isinstance(self.step, ExpertStep):  # per MoE layer: the experts removed, every expert's score
            out["removed"] = {str(i): r for i, r in sorted(self.step.removed.items())}
            out["scores"] = {str(i): s for i, s in sorted(self.step.scores.items())}
        elif isinstance(self.step, HiddenStep):
            kept = set(self.step.kept.tolist())
            out["removed"] = [i for i in range(self.step.residual.hidden) if i not in kept]
        elif self.kind != "channels":  # channel lists would be long; heads and groups are few
            out["removed"] = {str(i): r for i, r in self.step.removed.items()}
        return out


def reduced_shape(units: Units, name: str, shape: tuple[int, ...], remove: int) -> tuple[int, ...]:
    """``shape`` of layer tensor ``name`` once ``remove`` units per block are gone."""
    for owned in units.tensors:
        if owned.name == name:
            width = int((owned.owner >= 0).sum()) // units.count  # positions per unit
            out = list(shape)
            out[owned.dim] -= width * remove * units.blocks
            return tuple(out)
    return shape


def plan(cfg: PruneConfig, source: Source, device: torch.device, progress: bool = True,
         influence: list[float] | None = None, calib_ids: torch.Tensor | None = None) -> Shrink:
    """Everything fixed before writing: units, counts, the output config (checked against
    transformers), and for layers the block influence pass (unless a resumed run passes its
    ``influence`` scores). ``calib_ids``: calibration windows tokenised earlier."""
    layout, kind = source.layout, cfg.parsed_pattern.kind
    text = layout.config.get_text_config()
    if kind == "layers":
        return _plan_layers(cfg, source, device, progress, influence, calib_ids)
    if kind == "experts":
        return _plan_experts(cfg, source, device, calib_ids)
    if kind == "hidden":
        raise LlmpruneError("--pattern hidden is planned by llmprune.hidden")
    units = [units_of(layout, i, kind) for i in range(layout.num_layers)]
    if len({(u.blocks, u.per_block) for u in units}) != 1:
        raise LlmpruneError(f"--pattern {kind}: decoder layers differ in their number of units")
    remove = removal_count(kind, units[0].per_block, cfg.sparsity)
    values = shrunk_config_values(layout, units[0], units[0].per_block - remove)
    check_expressible(layout, values, {
        i: {n: reduced_shape(units[i], n, tuple(p.shape), remove) for n, p in layout.layer_module(i).named_parameters()}
        for i in range(layout.num_layers)})
    acts = None
    if cfg.method in UNIT_SCORES:
        acts = _calibrated_activations(cfg, source, device, calib_ids)
    step = UnitStep(layout, units, remove, cfg.norm, acts, cfg.method, cfg.reconstruct and acts is not None)
    importance = (f"{UNIT_SCORES[cfg.method]} on calibration data ({cfg.method})" if acts is not None
                  else f"{cfg.norm} norm of the unit's weights")
    if step.reconstruct:
        importance += "; kept readout columns re-fitted by least squares"
    before = {k: getattr(text, k, None) for k in values}
    log.info("%s: removing %d of %d %s in each of %d layers (%s)", kind, remove * units[0].blocks, units[0].count,
             UNIT_NAMES[kind], layout.num_layers, importance)
    return Shrink(layout, kind, cfg.sparsity, step, values, before, importance,
                  calibration=acts.windows if acts is not None else None)


def _plan_experts(cfg: PruneConfig, source: Source, device: torch.device, calib_ids: torch.Tensor | None) -> Shrink:
    """Expert counts and the output config, checked against transformers before any calibration."""
    layout = source.layout
    tensors = [expert_removal.expert_tensors(layout, i) for i in range(layout.num_layers)]
    counts = expert_removal.plan_counts(layout, tensors, cfg.sparsity)
    shapes = {}
    for i, info in enumerate(tensors):
        params = layout.layer_module(i).named_parameters()
        shapes[i] = {n: (counts.kept, *p.shape[1:]) if info is not None and n in info.memory else tuple(p.shape)
                     for n, p in params}
    shrunk = check_expressible(layout, counts.values, shapes)
    acts = _calibrated_activations(cfg, source, device, calib_ids)
    step = ExpertStep(layout, tensors, counts, shrunk, acts, cfg.method)
    text = layout.config.get_text_config()
    before = {k: getattr(text, k, None) for k in counts.values}
    importance = f"{expert_removal.SCORES[cfg.method]} on calibration data ({cfg.method})"
    log.info("experts: removing %d of %d routed experts in each of %d MoE layers (%s)", counts.remove, counts.count,
             sum(t is not None for t in tensors), importance)
    return Shrink(layout, "experts", cfg.sparsity, step, values=counts.values, before=before, importance=importance,
                  calibration=acts.windows)


def _calibrated_activations(cfg: PruneConfig, source: Source, device: torch.device,
                            ids: torch.Tensor | None = None) -> Activations:
    store = calibration_store(cfg, source, device)
    outer, ids = calibration(cfg, source, device, store, ids)
    return Activations(outer, ids, calibration_batch(device, ids.shape[1]), store)


def _plan_layers(cfg: PruneConfig, source: Source, device: torch.device, progress: bool,
                 influence: list[float] | None, calib_ids: torch.Tensor | None = None) -> Shrink:
    layout = source.layout
    remove = removal_count("layers", layout.num_layers, cfg.sparsity)
    calibrated = None
    if influence is None:
        step = InfluenceStep(_calibrated_activations(cfg, source, device, calib_ids))
        calibrated = step.acts.windows
        for layer in stream_layers(source.checkpoint, layout, device, desc="block influence", progress=progress):
            step(layer)
        influence = step.scores
    scores = torch.tensor(influence, dtype=torch.float64)
    dropped = set(torch.nonzero(~masks.units(scores[None], remove)[0]).squeeze(1).tolist())
    values = without_layers(layout, dropped)
    kept = [i for i in range(layout.num_layers) if i not in dropped]
    check_expressible(layout, values, {new: {n: tuple(p.shape) for n, p in layout.layer_module(old).named_parameters()}
                                       for new, old in enumerate(kept)})
    text = layout.config.get_text_config()
    before = {k: getattr(text, k, None) for k in values}
    log.info("layers: removing %s of %d (lowest block influence)", sorted(dropped), layout.num_layers)
    return Shrink(layout, "layers", cfg.sparsity, LayerDropStep(layout, dropped), values, before,
                  "block influence (1 - mean cosine of hidden states in and out)", influence, calibrated)
