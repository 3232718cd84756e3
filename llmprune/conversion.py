"""A decoder layer's tensors on disk and in memory: transformers' checkpoint conversion rules (the
ones ``from_pretrained`` and ``save_pretrained`` apply, e.g. per-expert ``experts.3.w1.weight``
tensors <-> one fused ``experts.gate_up_proj``) applied to the names of one layer, and their
reverse, so a layer streams in the input's on-disk layout without the whole model.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from transformers import PretrainedConfig, PreTrainedModel

from .errors import LlmpruneError

try:  # transformers >= 5; 4.x keeps experts as per-expert modules, stored as they are named
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        apply_converters,
        apply_renamings,
        dot_natural_key,
    )
except ImportError:  # pragma: no cover - exercised only with transformers 4.x
    get_checkpoint_conversion_mapping = get_model_conversion_mapping = None
    WeightConverter = WeightRenaming = None

    def dot_natural_key(name: str) -> list:
        return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]




def conversion_rules(source: PretrainedConfig | PreTrainedModel) -> list:
    """transformers' checkpoint conversion rules (``WeightRenaming`` / ``WeightConverter``) for a model.

    A model (the meta-device skeleton will do) gets exactly what ``from_pretrained`` uses, scoped to
    sub-models of multimodal wrappers; a config gets the rules of its ``model_type``.
    """
    if get_model_conversion_mapping is None:
        return []
    if isinstance(source, PreTrainedModel):
        return get_model_conversion_mapping(source)
    rules = get_checkpoint_conversion_mapping(source.model_type) or []
    return rules + (get_checkpoint_conversion_mapping("legacy") or [])


def _anchored(rule) -> bool:
    return all(p.startswith("^") for p in rule.source_patterns)


def prefix_renamings(rules: list) -> list:
    """The renamings among ``rules`` that move whole sub-models, every source pattern anchored at
    the start of the name (``^language_model`` -> ``model.language_model``, GPT-NeoX's ``^embed_out.``
    -> ``lm_head.``): they rename a checkpoint name's prefix, never a tensor inside a layer."""
    if WeightRenaming is None:
        return []
    return [r for r in rules if isinstance(r, WeightRenaming) and _anchored(r)]


def layer_rules(rules: list) -> list:
    """``rules`` without the ``prefix_renamings``: those ``plan_layer`` applies to one layer."""
    prefix = {id(r) for r in prefix_renamings(rules)}
    return [r for r in rules if id(r) not in prefix]


def rename(name: str, renamings: list) -> str:
    """``name`` (on disk) as ``from_pretrained`` renames it by ``renamings``, in turn."""
    return apply_renamings(name, renamings) if renamings else name


@dataclass(frozen=True)
class Group:
    """One in-memory tensor and the on-disk tensors it is made of.

    ``parts`` holds the on-disk names per converter source pattern (e.g. w1 then w3), each in expert
    order; ``ops`` names transformers' operations applied in turn, e.g. ``MergeModulelist(dim=0)``
    (stack each part's experts along dim 0) then ``Concatenate(dim=1)`` (join the parts along dim 1).
    A plain tensor (possibly renamed) is one part of one name and no ops.
    """

    target: str  # in-memory name, same prefix convention as the checkpoint names given
    parts: tuple[tuple[str, ...], ...]
    ops: tuple[str, ...] = ()
    _converter: Any = field(default=None, repr=False, compare=False)
    _patterns: tuple[str, ...] = field(default=(), repr=False, compare=False)  # the converter's, per part
    _renamed: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)  # (renamed, on disk)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(n for part in self.parts for n in part)

    @property
    def fused(self) -> bool:
        return self._converter is not None


@dataclass(frozen=True)
class LayerPlan:
    """How one decoder layer's checkpoint tensors map to its in-memory parameters and back."""
    groups: tuple[Group, ...]
    config: PretrainedConfig | None = None

    def __post_init__(self):
        object.__setattr__(self, "_by_target", {g.target: g for g in self.groups})

    def group(self, target: str) -> Group:
        return self._by_target[target]

    @property
    def targets(self) -> list[str]:
        return [g.target for g in self.groups]

    def to_memory(self, tensors: Mapping[str, torch.Tensor], targets: Iterable[str] | None = None
                  ) -> dict[str, torch.Tensor]:
        """The in-memory tensors (by target name; only ``targets`` when given) built from on-disk
        ``tensors`` (by checkpoint name)."""
        out = {}
        for g in self.groups if targets is None else [self._by_target[t] for t in targets]:
            missing = [n for n in g.sources if n not in tensors]
            if missing:
                raise LlmpruneError(f"{g.target} needs {missing[0]!r}, which was not read")
            if not g.fused:
                out[g.target] = tensors[g.sources[0]]
                continue
            converter = deepcopy(g._converter)
            for pattern, names in zip(g._patterns, g.parts):
                for name in names:
                    converter.add_tensor(g.target, name, pattern, tensors[name])
            built = converter.convert(g.target, config=self.config)
            if set(built) != {g.target}:
                raise LlmpruneError(f"transformers built {sorted(built)} for {g.target}")
            value = built[g.target]
            out[g.target] = value[0] if isinstance(value, list) else value
        return out

    def to_disk(self, tensors: Mapping[str, torch.Tensor], like: Mapping[str, Any] | None = None
                ) -> dict[str, torch.Tensor]:
        """On-disk tensors from in-memory ``tensors`` (any subset of the targets), under the original
        names. With ``like`` (checkpoint name -> anything with ``shape`` and ``dtype``: the tensors read,
        or checkpoint specs) each is checked against its shape and cast to its dtype. Pieces may be
        views of the given tensors."""
        out = {}
        for target, tensor in tensors.items():
            g = self._by_target.get(target)
            if g is None:
                raise LlmpruneError(f"{target!r} is not a tensor of this layer")
            pieces = _split(g, tensor, self.config) if g.fused else {g.sources[0]: tensor}
            for name, piece in pieces.items():
                if like is not None:
                    spec = like[name]
                    if tuple(piece.shape) != tuple(spec.shape):
                        raise LlmpruneError(f"{name} would be {tuple(piece.shape)}, the checkpoint has "
                                            f"{tuple(spec.shape)}")
                    piece = piece.to(spec.dtype)
                out[name] = piece
        return out


def _split(g: Group, tensor: torch.Tensor, config: PretrainedConfig | None) -> dict[str, torch.Tensor]:
    """transformers' reverse of ``g``'s conversion, as ``save_pretrained`` runs it."""
    reverse = g._converter.reverse_transform()
    key, pattern = apply_converters(g.target, [reverse])
    if pattern is None:
        raise LlmpruneError(f"transformers' reverse conversion does not match {g.target}")
    reverse.add_tensor(key, g.target, pattern, tensor)
    pieces = reverse.convert(key, config=config)
    renamed = dict(g._renamed)
    if set(pieces) != set(renamed):
        raise LlmpruneError(f"transformers splits {g.target} into {sorted(pieces)[:3]}..., not the checkpoint's "
                            f"{sorted(renamed)[:3]}...")
    return {renamed[k]: (v[0] if isinstance(v, list) else v) for k, v in pieces.items()}


def plan_layer(source: PretrainedConfig | PreTrainedModel, names: Iterable[str], rules: list | None = None
               ) -> LayerPlan:
    """Which of one decoder layer's checkpoint tensors (``names``, full names) make up each in-memory
    tensor, by transformers' conversion rules for ``source`` (``conversion_rules``; or ``rules``).

    Targets keep the names' prefix convention (a checkpoint without the base-model prefix gives
    targets without it). Tensors no rule converts map one to one, renamed where a rule renames them
    (Mixtral's ``block_sparse_moe`` is ``mlp`` in memory); checkpoints already fused on disk (gpt-oss,
    or saved with ``save_original_format=False``) match no converter and map one to one.
    """
    config = source.config if isinstance(source, PreTrainedModel) else source
    rules = deepcopy(conversion_rules(source) if rules is None else rules)
    renamings = [r for r in rules if WeightRenaming is not None and isinstance(r, WeightRenaming)]
    converters = [r for r in rules if WeightConverter is not None and isinstance(r, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    found: dict[str, tuple[Any, dict[str, list[tuple[str, str]]]]] = {}
    for name in sorted(names, key=dot_natural_key):  # transformers' own order: experts 0, 1, ..., 10
        renamed = apply_renamings(name, renamings) if renamings else name
        target, pattern = apply_converters(renamed, converters) if converters else (renamed, None)
        converter, collected = found.setdefault(target, (by_pattern.get(pattern), {}))
        if (converter is None) != (pattern is None) or (pattern is None and collected):
            raise LlmpruneError(f"two checkpoint tensors of this layer both load as {target!r}")
        collected.setdefault(pattern, []).append((renamed, name))
    groups = []
    for target, (converter, collected) in found.items():
        if converter is None:
            (_, name), = collected[None]
            groups.append(Group(target, ((name,),)))
            continue
        converter = deepcopy(converter)
        patterns = [p for p in converter.source_patterns if p in collected]
        parts = tuple(tuple(n for _, n in collected[p]) for p in patterns)
        if len(patterns) != len(converter.source_patterns) or len({len(p) for p in parts}) != 1:
            counts = {p: len(collected.get(p, [])) for p in converter.source_patterns}
            raise LlmpruneError(f"{target}: the checkpoint has an incomplete set of experts {counts}")
        renamed = tuple((r, n) for p in patterns for r, n in collected[p])
        groups.append(Group(target, parts, tuple(repr(op) for op in converter.operations), converter,
                            tuple(patterns), renamed))
    return LayerPlan(tuple(groups), config)


