"""The input model: resolve a folder, Hub id or packaged name, open its checkpoint, discover its
structure, and the small things every workflow reads from it (tokenizer, recipe, dtype)."""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from . import ratios
from .arch import Layout, context_length, layout_of, load_config
from .checkpoint import Checkpoint, resolve
from .conversion import LayerPlan, conversion_rules, layer_rules, plan_layer, prefix_renamings, rename
from .errors import LlmpruneError, one_line
from .experts import UP, Expert, find_moe, uncovered_weights
from .hubstream import HubCheckpoint
from .packaged import resolve_packaged

log = logging.getLogger(__name__)

# Tensor name endings of quantized formats: left after the reader dequantized what config.json
# declares, they are quantized bytes without a format to read them by
QUANTIZED = {"weight_scale_inv": "FP8 block-quantized (weight_scale_inv)", "_blocks": "MXFP4 (_blocks/_scales)",
             "_scales": "MXFP4 (_blocks/_scales)"}

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Source:
    """An input model: its folder, checkpoint and layout, and its tokenizer once asked for."""
    folder: Path
    info: dict
    checkpoint: Checkpoint
    layout: Layout
    tokenizer_from: str | None = None  # a folder, Hub id or packaged name whose tokenizer replaces the folder's
    _tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (or ``tokenizer_from``'s), loaded on first use and kept: a run
        tokenises calibration and evaluation text with one instance."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder, self.tokenizer_from)
        return self._tokenizer


def open_source(model: str, revision: str | None = None, stream_from_hub: bool = False,
                tokenizer: str | None = None) -> Source:
    """Resolve ``model`` and discover its structure; every failure is a one-line error.

    ``stream_from_hub``: a Hub id's shards are downloaded one at a time as they are read.
    ``tokenizer``: a folder, Hub id or packaged name to take the tokenizer from (for a folder without one).
    """

    packaged = resolve_packaged(model)
    folder, info = (packaged, {"model": model, "path": str(packaged)}) if packaged else \
        resolve(model, revision, weights=not stream_from_hub)
    if not (folder / "config.json").is_file():
        raise LlmpruneError(f"{folder} has no config.json: not a Hugging Face model folder")
    if stream_from_hub and "commit" in info:

        checkpoint = HubCheckpoint(folder, model, info["commit"])
    else:
        checkpoint = Checkpoint(folder)
    if checkpoint.dequantized:
        log.info("%s on read", checkpoint.dequantized)
    layout = layout_of(load_config(str(folder)))
    names = set(checkpoint.names)
    renamings = prefix_renamings(conversion_rules(layout.skeleton))
    layout.match_checkpoint(names, (lambda name: rename(name, renamings)) if renamings else None)
    match_experts(layout, names)
    outside = layout.outside_language_model()
    if outside:
        log.info("%s: outside the language model (pruned only with --prune-vision)",
                 ", ".join(f"{name} ({count:,} parameters)" for name, count in outside.items()))
    return Source(folder, info, checkpoint, layout, tokenizer)


def fused_experts(source: Source) -> int:
    """How many routed expert matrices ``source`` holds in fused (E, ., .) tensors."""
    return sum(len(source.layout.expert_matrices(i)) for i in range(source.layout.num_layers))


def match_experts(layout: Layout, names: Iterable[str]) -> None:
    """Fill ``layout``'s mixture-of-experts fields for a checkpoint holding ``names``: each layer's
    MoE blocks, the plan of each layer not stored one to one, and every expert matrix. Routers and
    shared-expert gates leave the prunable linears; weights nothing covers are named in a warning."""
    per_layer: list[list[str]] = [[] for _ in range(layout.num_layers)]
    for name in names:
        index = layout.layer_of(name)
        if index is not None:
            per_layer[index].append(name)
            for ending, fmt in QUANTIZED.items():
                if name.endswith(ending):
                    raise LlmpruneError(f"{name}: {fmt} tensors, but config.json declares no quantization_config "
                                        "that reads them; dequantize the checkpoint first")
    layout.moe = [find_moe(layout.layer_module(i)) for i in range(layout.num_layers)]
    for index, blocks in enumerate(layout.moe):
        never = {n for block in blocks for n in block.never_prune()}
        layout.linears[index] = [lin for lin in layout.linears[index] if lin.weight not in never]
    rules = layer_rules(conversion_rules(layout.skeleton))
    for index, layer_names in enumerate(per_layer):
        if rules and layer_names:
            plan = plan_layer(layout.skeleton, layer_names, rules=rules)
            if any(g.fused or g.sources != (g.target,) for g in plan.groups):
                layout.plans[index] = plan
    layout.experts = [_experts_of(layout, i) for i in range(layout.num_layers)]
    _warn_uncovered(layout)


def check_routing(layout: Layout) -> None:
    """Refuse calibration when a fused experts module is called with tokens already grouped by
    expert (Llama 4's ``Llama4TextExperts(hidden)``) instead of ``(hidden, indices, weights)``:
    which rows reach which expert, with what weight, cannot be seen."""
    for index, blocks in enumerate(layout.moe):
        for block in blocks:
            if not block.weights or not block.weights[0].fused:
                continue
            experts = layout.layer_module(index).get_submodule(block.experts)
            if len(inspect.signature(experts.forward).parameters) < 3:
                raise LlmpruneError(f"{layout.config.model_type}: {type(experts).__name__} receives tokens already "
                                    "grouped by expert, so calibrated methods (wanda, sparsegpt, admm, OWL) cannot "
                                    "see each expert's inputs; use --method magnitude")


def _experts_of(layout: Layout, index: int) -> list[Expert]:
    """Every routed expert matrix of layer ``index`` held in a fused (E, ., .) tensor, named as the
    checkpoint stores it when it stores one tensor per expert (the halves of a fused gate|up come
    from the converter's sources in order: gate, then up). Experts that are per-expert ``nn.Linear``
    modules in memory are ordinary linears."""
    layer = layout.layer_module(index)
    prefix = layout.checkpoint_name(layout.layer_prefix(index))
    plan: LayerPlan | None = layout.plan(index)
    out = []
    for block in layout.moe[index]:
        for weight in block.weights:
            if not weight.fused:
                continue
            param = prefix + weight.param()
            group = plan.group(param) if plan is not None and param in plan.targets else None
            meta = layer.get_parameter(weight.param())
            for m in weight.matrices():
                name = prefix + m.label
                if group is not None and group.fused and len(group.parts) == (2 if m.part else 1) \
                        and len(group.parts[0]) == weight.num_experts:
                    name = group.parts[1 if m.part == UP else 0][m.expert]
                out.append(Expert(name, param, m, tuple(m.view(meta).shape)))
    return out


def _warn_uncovered(layout: Layout) -> None:
    """Name, once per pattern, each weight of >= 2 dims in a decoder layer that is neither a linear,
    an expert, a router nor a shared-expert gate: nothing prunes it."""
    seen = set()
    for index in range(layout.num_layers):
        covered = {lin.weight for lin in layout.linears[index]}
        for block in layout.moe[index]:
            covered.update(block.covered())
        for name in uncovered_weights(layout.layer_module(index), covered):
            pattern = f"{layout.layers_path}.*.{name}"
            if pattern not in seen:
                seen.add(pattern)
                log.warning("%s: no rule prunes this weight (not a linear or an expert); it is left dense", pattern)


def prunable_matrices(source: Source) -> list[ratios.Matrix]:
    """Every prunable matrix, layer by layer: the linears, then each expert's matrices."""
    out = []
    for index in range(source.layout.num_layers):
        for _, name in source.layout.linear_names(index):
            if name in source.checkpoint:
                out.append(ratios.Matrix(name, math.prod(source.checkpoint.spec(name).shape), index))
        out.extend(ratios.Matrix(e.name, e.numel, index) for e in source.layout.expert_matrices(index))
    return out


def vision_matrices(source: Source) -> list[ratios.Matrix]:
    """The linears outside the language model (a vision tower's, a projector's), as ``--prune-vision``
    prunes them; empty for a text-only model."""
    return [ratios.Matrix(name, math.prod(source.checkpoint.spec(name).shape), None)
            for _, name in source.layout.outside_linears() if name in source.checkpoint]


def capped_seqlen(source: Source, seqlen: int) -> int:
    """``seqlen`` capped by the model's context (calibration and training windows)."""
    context = context_length(source.layout.config)
    return min(seqlen, context) if context else seqlen


def model_folder(model: str, revision: str | None = None) -> Path:
    """The local folder of a folder path, a Hub id or ``packaged:smollm2``."""
    return resolve_packaged(model) or resolve(model, revision)[0]


# Files one of which every tokenizer transformers loads is saved with
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model",
                   "vocab.txt")
NO_TOKENIZER = "{} has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json): pass --tokenizer PATH_OR_ID"


def load_tokenizer(folder: Path, tokenizer_from: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``folder``, or of ``tokenizer_from`` (a folder, Hub id or packaged name) when given."""
    from transformers import AutoTokenizer

    if tokenizer_from is not None:
        where = str(model_folder(tokenizer_from))
    elif not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LlmpruneError(NO_TOKENIZER.format(folder))
    else:
        where = str(folder)
    try:
        return AutoTokenizer.from_pretrained(where)
    except Exception as err:  # missing files, bad JSON, unknown class: all mean "no usable tokenizer"
        hint = "" if tokenizer_from is not None else "; pass --tokenizer PATH_OR_ID"
        raise LlmpruneError(f"cannot load a tokenizer from {where}: {one_line(err)}{hint}") from None


def stored_dtype(source: Source) -> torch.dtype:
    """The dtype of the input's largest floating tensors."""
    floats = [source.checkpoint.spec(n) for n in source.checkpoint.names
              if source.checkpoint.spec(n).dtype.is_floating_point]
    return max(floats, key=lambda s: s.nbytes).dtype if floats else torch.float32


def input_record(source: Source) -> dict:
    """llmprune.json's "input": where it came from, its shards, and what reading it dequantized."""
    record = {**source.info, "shards": source.checkpoint.fingerprint()}
    if source.checkpoint.dequantized:
        record["dequantized"] = source.checkpoint.dequantized
    return record


def input_identity(source: Source) -> dict:
    """What identifies an input for resuming: its shards' layout and their modification times (a
    pruned folder rewritten with other options keeps its layout)."""
    shards = source.checkpoint.fingerprint()
    return {"shards": shards, "mtimes": {name: (source.folder / name).stat().st_mtime_ns for name in shards}}


def read_recipe(folder: Path, required: bool = False) -> dict:
    """The folder's llmprune.json; {} when there is none, unless ``required`` (a finished llmprune
    output is expected: then a missing or unreadable one is refused)."""
    path = folder / "llmprune.json"
    incomplete = f"{folder} is not a complete llmprune output: llmprune.json"
    if not path.is_file():
        if required:
            raise LlmpruneError(f"{incomplete} is missing or unreadable")
        return {}
    try:
        recipe = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LlmpruneError(f"{incomplete} is missing or unreadable" if required else f"{path} is not valid JSON") from None
    if not isinstance(recipe, dict):
        if required:
            raise LlmpruneError(f"{incomplete} is not an object")
        return {}
    return recipe


def group_names(checkpoint: Checkpoint, layout: Layout) -> tuple[list[str], list[list[str]]]:
    """Checkpoint tensor names outside the decoder layers, and those of each layer, in order."""
    outside: list[str] = []
    per_layer: list[list[str]] = [[] for _ in range(layout.num_layers)]
    for name in checkpoint.names:
        index = layout.layer_of(name)
        (outside if index is None else per_layer[index]).append(name)
    return outside, per_layer
