"""The only code that turns importance scores into keep-masks.

Every function takes scores shaped (out_features, in_features) -- the true input dimension last,
whatever the storage layout of the weight -- and returns a bool tensor of the same shape that is
True where the weight survives. Lower score = pruned first. Ties are broken deterministically:
among equal scores the one with the lower flat (row-major) index is pruned first, so a run is
reproducible on checkpoints with many exact ties (quantised weights).

N:M follows the SparseGPT and Wanda papers: in every group of M consecutive weights along the
input dimension, N are zeroed (2:4 and 4:8 both mean 50%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LlmpruneError

STRUCTURED = ("channels", "heads", "kv-heads", "layers", "experts", "hidden")
MIXABLE = ("channels", "heads", "kv-heads", "layers")  # the kinds one run can combine


@dataclass(frozen=True)
class Pattern:
    """How a matrix is pruned: "unstructured", N:M with ``n`` zeroed of every ``m``, a structured
    kind, or a ``mix`` of structured kinds (``parts``: each kind with its ratio, or None when a
    parameter target chooses it)."""
    kind: str = "unstructured"
    n: int = 0
    m: int = 0
    parts: tuple[tuple[str, float | None], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Pattern:
        if text == "unstructured":
            return cls()
        if text in STRUCTURED:
            return cls(text)
        if "," in text or "=" in text:
            return cls("mix", parts=_mix_parts(text))
        parts = text.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise LlmpruneError(
                f"malformed pattern {text!r}: expected 'unstructured', N:M with integers (e.g. 2:4), "
                f"one of {', '.join(STRUCTURED)}, or several of them, e.g. channels=0.2,heads=0.3"
            )
        n, m = int(parts[0]), int(parts[1])
        if m < 2 or not 0 < n < m:
            raise LlmpruneError(f"malformed N:M pattern {text!r}: need 0 < N < M")
        return cls("nm", n, m)

    @property
    def structured(self) -> bool:
        """Whole units are removed and the model shrinks (MLP channels, heads, KV groups, layers, experts,
        hidden width)."""
        return self.kind in STRUCTURED or self.kind == "mix"

    @property
    def kinds(self) -> tuple[str, ...]:
        """The structured kinds the pattern removes (empty when it is not structured)."""
        if self.kind == "mix":
            return tuple(kind for kind, _ in self.parts)
        return (self.kind,) if self.kind in STRUCTURED else ()

    @property
    def sparsity(self) -> float | None:
        """The sparsity the pattern itself fixes (N/M), or None when any ratio is allowed."""
        return self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        if self.kind == "mix":
            return ",".join(kind if r is None else f"{kind}={r:g}" for kind, r in self.parts)
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def _mix_parts(text: str) -> tuple[tuple[str, float | None], ...]:
    """``channels=0.2,heads=0.3`` (each kind's ratio) or ``channels,heads`` (kinds only)."""
    parts = []
    for item in text.split(","):
        kind, eq, ratio = (s.strip() for s in item.partition("="))
        if kind not in MIXABLE:
            raise LlmpruneError(f"malformed pattern {text!r}: {kind!r} is not one of {', '.join(MIXABLE)}")
        value = None
        if eq:
            try:
                value = float(ratio)
            except ValueError:
                raise LlmpruneError(f"malformed pattern {text!r}: the ratio of {kind} must be a number, "
                                    f"got {ratio!r}") from None
            if not 0 < value < 1:
                raise LlmpruneError(f"malformed pattern {text!r}: the ratio of {kind} must lie in (0, 1)")
        parts.append((kind, value))
    kinds = [k for k, _ in parts]
    if len(set(kinds)) != len(kinds):
        raise LlmpruneError(f"malformed pattern {text!r}: a kind is named twice")
    if {"heads", "kv-heads"} <= set(kinds):
        raise LlmpruneError(f"pattern {text!r}: heads and kv-heads both remove query heads; choose one")
    if len({r is None for _, r in parts}) > 1:
        raise LlmpruneError(f"malformed pattern {text!r}: give every kind a ratio (channels=0.2,heads=0.3) "
                            "or none (channels,heads with --target-params)")
    return tuple(parts)


def prune_count(numel: int, sparsity: float) -> int:
    """Number of zeros an unstructured prune of ``numel`` weights at ``sparsity`` produces."""
    return int(round(sparsity * numel))


def _order_key(scores: torch.Tensor) -> torch.Tensor | None:
    """Integers ordered like non-negative float ``scores``: their IEEE bit patterns.

    The sign bit is cleared so that -0.0 sorts as 0. None for dtypes without a fast path.
    """
    if scores.dtype in (torch.bfloat16, torch.float16):
        return scores.view(torch.int16) & 0x7FFF
    if scores.dtype == torch.float32:
        return scores.view(torch.int32) & 0x7FFFFFFF
    return None


def _first_reaching(values: torch.Tensor, k: int) -> tuple[int, int]:
    """First bin whose cumulative count reaches k, and how many values lie in earlier bins."""
    cum = torch.bincount(values if values.device.type == "cpu" else values.long(),
                         minlength=1).cumsum(0)
    b = int(torch.searchsorted(cum, k))
    return b, int(cum[b - 1]) if b else 0


def _kth_key(key: torch.Tensor, k: int) -> tuple[int, int]:
    """The k-th smallest (1-based) of a non-negative integer key by radix selection, and how
    many keys are strictly smaller."""
    if key.dtype == torch.int16:
        return _first_reaching(key, k)
    high = key >> 16
    b, before = _first_reaching(high, k)
    low, below = _first_reaching(key[high == b] & 0xFFFF, k - before)
    return (b << 16) | low, before + below


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask over non-negative 1-D ``scores`` marking the ``k`` lowest, ties to the lower index.

    Linear time: a radix selection over the float bit patterns (one histogram for 16-bit
    floats, two for fp32) finds the k-th value; only entries equal to it need the index tie-break.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    key = _order_key(scores)
    if key is None:
        key = scores
        threshold = torch.kthvalue(scores, k).values
        below = int(torch.count_nonzero(key < threshold))
    else:
        threshold, below = _kth_key(key, k)
    chosen = key < threshold
    tied = torch.nonzero(key == threshold).squeeze(1)
    chosen[tied[: k - below]] = True
    return chosen


def unstructured(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask with round(sparsity * numel) pruned weights, the lowest scores.

    ``per_row`` compares scores within each output row (Wanda) instead of across the whole
    matrix; every row then loses round(sparsity * in_features) weights.
    """
    if not per_row:
        return ~lowest_k(scores.reshape(-1), prune_count(scores.numel(), sparsity)).view_as(scores)
    k = prune_count(scores.shape[1], sparsity)
    order = torch.sort(scores, dim=1, stable=True).indices  # (out, in), ascending
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return keep


def n_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask zeroing the ``n`` lowest scores in each group of ``m`` along the input dim."""
    rows, cols = scores.shape
    if cols % m:
        raise LlmpruneError(f"input dimension {cols} is not a multiple of M={m} for N:M pruning")
    groups = scores.reshape(rows, cols // m, m)  # (out, in/m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, order[..., :n], False)
    return keep.reshape(rows, cols)


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.int8}


def apply(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``weight`` with pruned entries set to +0.0 and survivors bit-identical.

    Multiplying the integer view by the mask is the fastest exact way on CPU, and it never
    produces -0.0 the way ``weight * keep`` does for negative weights.
    """
    bits = weight.view(_SAME_WIDTH_INT[weight.element_size()])
    return (bits * keep).view(weight.dtype)


def select(scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool = False) -> torch.Tensor:
    """Keep-mask for one matrix: N:M groups when the pattern says so, else unstructured."""
    if pattern.kind == "nm":
        if sparsity == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        return n_m(scores, pattern.n, pattern.m)
    return unstructured(scores, sparsity, per_row)


def is_n_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` along the input dim of (out, in) ``weight`` has >= n zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)
    return bool((zeros >= n).all())


def units(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over structured units: the ``k`` lowest-scoring units of each block are removed.

    ``scores`` is (blocks, units per block), e.g. query heads within their KV group, or one block of
    MLP channels; every block loses exactly ``k``, so the result keeps one size for all blocks. Ties
    go to the lower index, as everywhere here.
    """
    order = torch.sort(scores, dim=1, stable=True).indices  # (blocks, per_block), ascending
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return keep
