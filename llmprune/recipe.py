from __future__ import annotations

import platform
import resource
from pathlib import Path

import torch
import transformers

from .checkpoint import TensorSpec
from .source import Source, prunable_matrices
from .version import __version__


def save_summary(folder: Path, save_format: str, specs: list[TensorSpec]) -> dict:
    """How the weights were saved: the format, their bytes on disk, and the dense size for comparison."""
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"format": save_format, "bytes": stored, "dense_bytes": sum(s.nbytes for s in specs)}


def versions() -> dict[str, str]:
    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sparsity_summary(source: Source, targets: dict[str, float], zeros: dict[str, int]) -> dict:
    matrices = prunable_matrices(source)
    per_matrix, per_layer_num, per_layer_den = {}, [0] * source.layout.num_layers, [0] * source.layout.num_layers
    for m in matrices:
        per_matrix[m.name] = {"target": targets.get(m.name, 0.0), "achieved": zeros[m.name] / m.numel, "numel": m.numel}
        per_layer_num[m.layer] += zeros[m.name]
        per_layer_den[m.layer] += m.numel
    total = sum(per_layer_den)
    return {
        "overall": sum(per_layer_num) / total,
        "target_mean": sum(targets.get(m.name, 0.0) * m.numel for m in matrices) / total,
        "matrices_pruned": sum(1 for m in matrices if targets.get(m.name, 0.0) > 0),
        "layers": [n / d if d else 0.0 for n, d in zip(per_layer_num, per_layer_den)],
        "matrices": per_matrix,
    }
