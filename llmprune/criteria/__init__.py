"""Pruning criteria, one small module each, behind one interface.

A criterion module sees one weight matrix, shaped (out_features, in_features), and the statistics
it asked for; never the model, the devices or the CLI. It provides:

- ``needs_calibration``: whether the engine must run calibration activations through the layer;
- ``init_stats(weight)`` and ``accumulate(stats, x)`` when it needs them, ``x`` being the
  layer input activations flattened to (tokens, in_features);
- ``prune(weight, sparsity, pattern, stats, norm) -> (new_weight, keep_mask)``.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import LlmpruneError
from . import admm, magnitude, sparsegpt, wanda

_REGISTRY: dict[str, ModuleType] = {"admm": admm, "magnitude": magnitude, "sparsegpt": sparsegpt, "wanda": wanda}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> ModuleType:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LlmpruneError(f"unknown method {name!r}: expected one of {', '.join(names())}") from None
