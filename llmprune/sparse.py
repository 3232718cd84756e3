"""llmprune's compressed sparse checkpoint format, ``sparse-bitmask`` version 1.

No mainstream runtime reads a compressed sparse checkpoint today (the compressed-tensors releases
transformers 5 needs dropped their sparse compressors, vLLM dropped 2:4 checkpoints), so llmprune
owns a small format. It is an ordinary Hugging Face folder in which every pruned matrix ``N``
(a 2-D tensor, e.g. ``model.layers.0.mlp.up_proj.weight``) is replaced by three tensors:

- ``N_bitmask``: uint8 (rows, ceil(cols / 8)); bit j of byte k of row r (least significant bit
  first) says whether column 8k + j of row r is stored; padding bits are 0;
- ``N_values``: 1-D, the matrix's dtype: the stored entries in row-major order;
- ``N_shape``: int64 (2,): rows and cols.

A position is stored when its bit pattern is not all zero (so -0.0 is stored, +0.0 is not);
decompressing scatters the values into +0.0 and gives the matrix back bit for bit. Every other
tensor is stored as is. ``config.json`` names the format and the compressed matrices::

    "sparsity_config": {"format": "sparse-bitmask", "version": 1, "compressed": ["N", ...]}

and, so that ``AutoModelForCausalLM.from_pretrained`` decompresses it after ``import llmprune``,
``"quantization_config": {"quant_method": "llmprune-sparse", ...}`` (see :mod:`llmprune.hf`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import LlmpruneError

FORMAT = "sparse-bitmask"
VERSION = 1
SAVE_FORMATS = ("dense", FORMAT)
CONFIG_KEY = "sparsity_config"
QUANT_METHOD = "llmprune-sparse"
PARTS = ("bitmask", "values", "shape")

_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def part_names(name: str) -> dict[str, str]:
    """The stored tensor names of compressed matrix ``name``, by part."""
    return {part: f"{name}_{part}" for part in PARTS}


def stored_mask(matrix: torch.Tensor) -> torch.Tensor:
    """Where ``matrix``'s bit pattern is not all zero (+0.0 is not stored, -0.0 is)."""
    return matrix.view(_SAME_WIDTH_INT[matrix.element_size()]) != 0


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """Bool (rows, cols) -> uint8 (rows, ceil(cols / 8)), least significant bit first."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    groups = padded.view(rows, -1, 8)  # (rows, bytes, 8)
    packed = torch.zeros(rows, groups.shape[1], dtype=torch.uint8, device=mask.device)
    for bit in range(8):  # eight byte-sized passes: no int64 intermediate the size of the matrix
        packed |= groups[..., bit] << bit
    return packed


def unpack_rows(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 (rows, ceil(cols / 8)) -> bool (rows, cols); the inverse of :func:`pack_rows`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (rows, bytes, 8)
    return bits.view(packed.shape[0], -1)[:, :cols].bool()


def compress(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 2-D tensor -> its ``bitmask``, ``values`` and ``shape`` parts."""
    if matrix.dim() != 2:
        raise ValueError(f"only matrices are compressed, got shape {tuple(matrix.shape)}")
    mask = stored_mask(matrix)
    return {"bitmask": pack_rows(mask), "values": matrix[mask],
            "shape": torch.tensor(matrix.shape, dtype=torch.int64)}


def decompress(parts: dict[str, torch.Tensor], name: str = "matrix") -> torch.Tensor:
    """The dense matrix from its parts, bit-identical to the one compressed."""
    shape = parts["shape"]
    if shape.dtype != torch.int64 or shape.shape != (2,):
        raise LlmpruneError(f"corrupt sparse checkpoint: {name}_shape is not two int64 values")
    rows, cols = (int(d) for d in shape)
    bitmask, values = parts["bitmask"], parts["values"]
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)) or values.dim() != 1:
        raise LlmpruneError(f"corrupt sparse checkpoint: {name}_bitmask or {name}_values has the wrong shape")
    mask = unpack_rows(bitmask, cols)
    if int(mask.sum()) != values.numel():
        raise LlmpruneError(f"corrupt sparse checkpoint: {name} has {int(mask.sum())} stored positions "
                            f"but {values.numel()} values")
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense[mask] = values
    return dense


def format_config(compressed: list[str]) -> dict:
    """The ``config.json`` entries that name the format and its compressed matrices."""
    return {
        CONFIG_KEY: {"format": FORMAT, "version": VERSION, "compressed": sorted(compressed)},
        "quantization_config": {"quant_method": QUANT_METHOD, "format": FORMAT, "version": VERSION},
    }


def compressed_names(config: dict, where: str = "config.json") -> list[str]:
    """The compressed matrices a ``config.json`` dict names; [] for a dense checkpoint."""
    entry = config.get(CONFIG_KEY)
    if entry is None:
        return []
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or not isinstance(entry.get("compressed"), list):
        raise LlmpruneError(f"{where}: {CONFIG_KEY} does not describe a {FORMAT} checkpoint")
    if entry.get("version") != VERSION:
        raise LlmpruneError(f"{where}: {FORMAT} version {entry.get('version')} is not supported "
                            f"(this llmprune reads version {VERSION}); upgrade llmprune")
    return list(entry["compressed"])


def folder_compressed_names(folder: Path) -> list[str]:
    """The compressed matrices of the checkpoint in ``folder`` ([] when dense or without config)."""
    path = folder / "config.json"
    if not path.is_file():
        return []
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LlmpruneError(f"cannot read {path}") from None
    return compressed_names(config, str(path)) if isinstance(config, dict) else []


def dense_config(config: dict) -> dict:
    """``config`` without the entries of the compressed format."""
    out = dict(config)
    out.pop(CONFIG_KEY, None)
    if (out.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
        out.pop("quantization_config")
    return out
