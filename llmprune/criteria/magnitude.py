"""Magnitude pruning: a weight's importance is its absolute value.

For single weights the L1 and L2 norms order weights identically (|w| vs w^2); ``norm`` matters
for structured units, where it is the norm over the unit's weights.
"""

from __future__ import annotations

import torch

from .. import masks
from ..masks import Pattern

needs_calibration = False


def scores(weight: torch.Tensor, norm: str = "l1") -> torch.Tensor:
    """Importance of each weight of an (out, in) matrix."""
    return weight.abs() if norm == "l1" else weight.float().square()


def prune(weight: torch.Tensor, sparsity: float, pattern: Pattern, stats: object = None,
          norm: str = "l1") -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the lowest-magnitude weights; survivors are returned bit-identical."""
    keep = masks.select(scores(weight, norm), sparsity, pattern)
    return masks.apply(weight, keep), keep
