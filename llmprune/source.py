"""The input model: resolve a folder, Hub id or packaged name, open its checkpoint, discover its
structure, and the small things every workflow reads from it (tokenizer, recipe, dtype)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import ratios
from .arch import Layout, context_length, layout_of, load_config
from .checkpoint import Checkpoint, resolve
from .errors import LlmpruneError, one_line
from .hubstream import HubCheckpoint
from .packaged import resolve_packaged

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Source:
    """An input model: its folder, checkpoint and layout, and its tokenizer once asked for."""

    folder: Path
    info: dict
    checkpoint: Checkpoint
    layout: Layout
    _tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer, loaded on first use and kept: a run tokenises calibration and
        evaluation text with one instance."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer


def open_source(model: str, revision: str | None = None, stream_from_hub: bool = False) -> Source:
    """Resolve ``model`` and discover its structure; every failure is a one-line error.

    ``stream_from_hub``: a Hub id's shards are downloaded one at a time as they are read.
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
    layout = layout_of(load_config(str(folder)))
    layout.match_checkpoint(set(checkpoint.names))
    return Source(folder, info, checkpoint, layout)


def prunable_matrices(source: Source) -> list[ratios.Matrix]:
    out = []
    for index in range(source.layout.num_layers):
        for _, name in source.layout.linear_names(index):
            if name in source.checkpoint:
                out.append(ratios.Matrix(name, math.prod(source.checkpoint.spec(name).shape), index))
    return out


def capped_seqlen(source: Source, seqlen: int) -> int:
    """``seqlen`` capped by the model's context (calibration and training windows)."""
    context = context_length(source.layout.config)
    return min(seqlen, context) if context else seqlen


def model_folder(model: str, revision: str | None = None) -> Path:
    """The local folder of a folder path, a Hub id or ``packaged:smollm2``."""

    return resolve_packaged(model) or resolve(model, revision)[0]


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # missing files, bad JSON, unknown class: all mean "no usable tokenizer"
        raise LlmpruneError(f"cannot load a tokenizer from {folder}: {one_line(err)}") from None


def stored_dtype(source: Source) -> torch.dtype:
    """The dtype of the input's largest floating tensors."""
    floats = [source.checkpoint.spec(n) for n in source.checkpoint.names
              if source.checkpoint.spec(n).dtype.is_floating_point]
    return max(floats, key=lambda s: s.nbytes).dtype if floats else torch.float32


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
