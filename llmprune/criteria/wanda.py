"""Wanda (Sun et al., 2023): a weight's importance is |W_ij| * ||X_j||_2.

||X_j||_2 is the L2 norm of input feature j over every calibration token. Scores are compared
within each output row for unstructured pruning, and within groups of M inputs for N:M.

``norm`` is accepted for the common interface; for single weights L1 and L2 rank identically
(|W| ||X|| vs W^2 ||X||^2), so it changes nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import masks
from ..errors import LlmpruneError
from ..masks import Pattern

needs_calibration = True


@dataclass
class InputNorms:
    """Running sum over tokens of each squared input feature, in float32 on the weight's device."""
    sum_sq: torch.Tensor  # (in,)
    tokens: int = 0


def init_stats(weight: torch.Tensor) -> InputNorms:
    return InputNorms(torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device))


def stats_bytes(out_features: int, in_features: int) -> int:
    """Memory of the statistics of one (out, in) matrix: a float32 norm per input."""
    return 4 * in_features


@torch.no_grad()
def accumulate(stats: InputNorms, x: torch.Tensor) -> None:
    """Add a batch of layer inputs ``x`` (tokens, in); leading batch dims are flattened."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[1] != stats.sum_sq.shape[0]:
        raise LlmpruneError(f"wanda: activations have {x.shape[1]} features, the layer takes {stats.sum_sq.shape[0]}")
    # One float32 copy, squared in place; sum() over tokens is a cascaded (accurate) reduction,
    # unlike vector_norm(dim=0). The ranking ignores the global 1/n the paper divides by.
    stats.sum_sq += x.to(stats.sum_sq.device, torch.float32, copy=True).square_().sum(dim=0)
    stats.tokens += x.shape[0]


def scores(weight: torch.Tensor, stats: InputNorms | None) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for an (out, in) matrix, in float32."""
    if stats is None or stats.tokens == 0:
        raise LlmpruneError("wanda needs calibration activations, but none reached this layer")
    if stats.sum_sq.shape[0] != weight.shape[1]:
        raise LlmpruneError(f"wanda: statistics for {stats.sum_sq.shape[0]} inputs, the weight has {weight.shape[1]}")
    return weight.abs().float() * stats.sum_sq.sqrt().to(weight.device)  # (out, in) * (in,)


@torch.no_grad()
def prune(weight: torch.Tensor, sparsity: float, pattern: Pattern, stats: InputNorms | None,
          norm: str = "l1") -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the lowest-scoring weights of each row (or N:M group); survivors are bit-identical."""
    keep = masks.select(scores(weight, stats), sparsity, pattern, per_row=True)
    return weight.masked_fill(~keep, 0), keep
