"""The recipe a run records as llmprune.json, as a typed object, and the measurements it holds:
package versions, peak memory, the achieved sparsity of every matrix, how the weights were saved.
"""

from __future__ import annotations

import json
import platform
import resource
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import transformers

from .checkpoint import TensorSpec
from .source import Source, prunable_matrices, vision_matrices
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


def sparsity_summary(source: Source, targets: dict[str, float], zeros: dict[str, int],
                     vision: dict | None = None) -> dict:
    """The decoder linears' targets and zeros, matrix by matrix and layer by layer; a multimodal
    model's parts beside the language model under ``not_pruned``, or under ``vision`` (its
    ``vision_summary``) those whose linears --prune-vision pruned."""
    matrices = prunable_matrices(source)
    per_matrix, per_layer_num, per_layer_den = {}, [0] * source.layout.num_layers, [0] * source.layout.num_layers
    for m in matrices:
        per_matrix[m.name] = {"target": targets.get(m.name, 0.0), "achieved": zeros[m.name] / m.numel, "numel": m.numel}
        per_layer_num[m.layer] += zeros[m.name]
        per_layer_den[m.layer] += m.numel
    total = sum(per_layer_den)
    summary = {
        "overall": sum(per_layer_num) / total,
        "target_mean": sum(targets.get(m.name, 0.0) * m.numel for m in matrices) / total,
        "matrices_pruned": sum(1 for m in matrices if targets.get(m.name, 0.0) > 0),
        "layers": [n / d if d else 0.0 for n, d in zip(per_layer_num, per_layer_den)],
        "matrices": per_matrix,
    }
    if vision:
        summary["vision"] = vision
    pruned = set(vision["parts"]) if vision else set()
    outside = {part: n for part, n in source.layout.outside_language_model().items() if part not in pruned}
    if outside:  # a multimodal model's vision tower and projector: parameters per part, written unchanged
        summary["not_pruned"] = outside
    return summary


def vision_summary(source: Source, targets: dict[str, float], zeros: dict[str, int]) -> dict:
    """--prune-vision: the linears outside the language model, matrix by matrix, all pruned by
    magnitude, and the parts (checkpoint prefixes) they belong to."""
    matrices = vision_matrices(source)
    numel = sum(m.numel for m in matrices)
    pruned = [m for m in matrices if targets.get(m.name, 0.0) > 0]
    return {
        "criterion": "magnitude",
        "why": "calibration text reaches only the language model",
        "parts": [part for part in source.layout.outside_language_model()
                  if any(m.name.startswith(part + ".") for m in pruned)],
        "overall": sum(zeros[m.name] for m in matrices) / numel,
        "target_mean": sum(targets.get(m.name, 0.0) * m.numel for m in matrices) / numel,
        "matrices_pruned": len(pruned),
        "matrices": {m.name: {"target": targets.get(m.name, 0.0), "achieved": zeros[m.name] / m.numel,
                              "numel": m.numel} for m in matrices},
    }


@dataclass
class Recipe:
    """llmprune.json. Fields are its keys, in the order they are written; a None field is left out.

    Sections stay plain JSON objects (dicts), written by the step that measures them: ``eval``
    (dense, pruned and ratio), ``calibration``, ``owl``, ``input`` (id, revision, shards), ``config``
    (every option), ``sparsity`` (``sparsity_summary``), ``save`` (``save_summary``), ``structured``
    (config changes, units removed), ``finetune`` (the fine-tune's own options and results).
    Keys this version does not know, from another version's file, are kept in ``extra`` and
    written back after the known ones.
    """

    format: str = "llmprune/1"
    eval: dict | None = None
    calibration: dict | None = None
    owl: dict | None = None
    resumed_after_layers: int | None = None
    created: str | None = None
    command: str | None = None
    input: dict | None = None
    config: dict | None = None
    versions: dict | None = None
    device: str | None = None
    sparsity: dict | None = None
    save: dict | None = None
    structured: dict | None = None
    wall_time_s: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    plots: dict | None = None
    finetune: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def write(self, folder: Path) -> None:
        (folder / "llmprune.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
