"""SparseGPT (Frantar & Alistarh, 2023): prune with an approximate OBS update of the survivors.

The layer-wise objective is ||WX - W'X||^2 with Hessian H = 2 X X^T / n. Columns are processed
left to right in lazy blocks; pruning a weight spreads its error over the not-yet-processed
columns of the same row through the upper Cholesky factor of H^-1, whose diagonal d also gives
the OBS score w^2 / d^2 that chooses what to prune.

Exact sparsity: the reference chooses each block's mask by a threshold (one weight too many per
block, more on ties), so the matrix total drifts from round(sparsity * numel). Here the block over
columns [c0, c1) prunes exactly round(s * rows * c1) - round(s * rows * c0) weights (masks.lowest_k,
ties to the lower index): the counts telescope to round(s * rows * cols) for the whole matrix, and
each block's share is within one weight of s * its size. N:M is exact by construction: at every
M-th column the N lowest scores of the next M columns are pruned.

Inputs that never fired (H_ii = 0) have their weights zeroed, as in the reference; they score 0 and
are pruned first, but if they outnumber the prune count some zeros are left marked as kept.

One statistics object may serve several matrices (the engine shares it between linears that read
the same input, as q, k and v do): the factor of H^-1 is computed at the first ``prune`` and kept,
and H itself is dropped then, so a shared Hessian is accumulated and factored once.

``norm`` is accepted for the common interface and changes nothing for single weights.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import masks
from ..errors import LlmpruneError
from ..masks import Pattern, prune_count

log = logging.getLogger(__name__)

needs_calibration = True

_DAMP_RETRIES = 4  # dampening grows tenfold per retry when H + damp*I is not positive definite


@dataclass
class Hessian:
    """Running average of 2 x x^T over tokens, (in, in) float32 on the weight's device.

    After the first ``prune``, ``h`` is None and ``factor`` (the upper factor of the damped
    inverse), ``dead`` (inputs with H_ii = 0) and the ``percdamp`` used hold what pruning needs.
    """

    h: torch.Tensor | None
    tokens: int = 0
    factor: torch.Tensor | None = None
    dead: torch.Tensor | None = None
    percdamp: float | None = None


def init_stats(weight: torch.Tensor) -> Hessian:
    n = weight.shape[1]
    return Hessian(torch.zeros(n, n, dtype=torch.float32, device=weight.device))


def stats_bytes(out_features: int, in_features: int) -> int:
    """Memory of the statistics of one (out, in) matrix: the float32 Hessian, and its factor while pruning."""
    return 2 * 4 * in_features * in_features


@torch.no_grad()
def accumulate(stats: Hessian, x: torch.Tensor) -> None:
    """Fold a batch of layer inputs ``x`` (tokens, in) into H; leading batch dims are flattened."""
    x = x.reshape(-1, x.shape[-1])
    if stats.h is None:
        raise LlmpruneError("sparsegpt: statistics already used for pruning cannot take more activations")
    if x.shape[1] != stats.h.shape[0]:
        raise LlmpruneError(f"sparsegpt: activations have {x.shape[1]} features, the layer takes {stats.h.shape[0]}")
    if x.shape[0] == 0:
        return
    total = stats.tokens + x.shape[0]
    # Keep H an average rather than a sum, so it stays O(|x|^2) however many batches arrive.
    stats.h *= stats.tokens / total
    x = x.to(stats.h.device, torch.float32)
    stats.h.addmm_(x.t(), x, alpha=2 / total)
    stats.tokens = total


def inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (so U^T U = H^-1), damp = percdamp * mean(diag H).

    When H is not numerically positive definite the dampening grows tenfold, a few times.
    Working memory besides ``h``: two n x n matrices (3.3 GB each for a 70B down_proj), and above
    ``INVERSE_LEAF`` inputs about 0.55 n^2 more for the blocked inverse (measured at n = 8192).
    """
    if not torch.isfinite(h).all():
        raise LlmpruneError("sparsegpt: the Hessian has non-finite entries (inf or NaN calibration activations)")
    mean_diag = h.diagonal().mean()
    fracs = [percdamp] + [max(percdamp, 1e-3) * 10**i for i in range(1, _DAMP_RETRIES + 1)]
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt, frac in enumerate(fracs):
        if attempt:
            log.warning("sparsegpt: Hessian not positive definite with dampening %.3g; retrying with %.3g",
                        fracs[attempt - 1], frac)
        # With J the reversal permutation and J H J = L L^T, U = J L^-1 J is upper triangular and
        # U^T U = J L^-T L^-1 J = H^-1: one Cholesky and one triangular solve, H^-1 never formed
        # (1.6x faster than factoring H, inverting, and factoring H^-1 again; and more accurate).
        # Factored in place in column-major order: no LAPACK copy, and the out-of-place rounding.
        lower = torch.empty_like(h).mT
        lower.copy_(h.flip(0, 1))
        lower.diagonal().add_(frac * mean_diag)
        torch.linalg.cholesky_ex(lower, out=(lower, info))
        if info == 0:
            inv = lower_inverse(lower)
            del lower
            return inv.flip(0, 1)
        del lower
    raise LlmpruneError(f"sparsegpt: Hessian not positive definite even with dampening {fracs[-1]:.3g}")


def lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L^-1 of a lower triangular ``lower``, column-major, in one more n x n matrix.

    Up to ``INVERSE_LEAF`` it is one triangular solve against I, in place in a column-major identity
    (n^3 flops). Above, blocked: with L = [[A, 0], [B, C]], L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]],
    the corner by two triangular solves with A and C themselves and the diagonal blocks recursively,
    n^3 / 3 flops in all: a third of the work for a 70B down_proj (n = 28672).
    """
    inv = torch.eye(lower.shape[0], device=lower.device, dtype=lower.dtype).mT
    _invert_into(lower, inv)
    return inv


INVERSE_LEAF = 4096


def _invert_into(lower: torch.Tensor, out: torch.Tensor) -> None:
    """Overwrite ``out`` (holding I) with lower^-1."""
    n = lower.shape[0]
    if n <= INVERSE_LEAF:
        torch.linalg.solve_triangular(lower, out, upper=False, out=out)
        return
    k = n // 2
    corner = torch.linalg.solve_triangular(lower[:k, :k], lower[k:, :k], upper=False, left=False)  # B A^-1
    torch.linalg.solve_triangular(lower[k:, k:], corner, upper=False, out=corner)  # C^-1 B A^-1, in place
    out[k:, :k] = corner
    out[k:, :k].neg_()
    del corner  # n^2 / 4 floats at the top level: the only workspace besides the result
    _invert_into(lower[:k, :k], out[:k, :k])
    _invert_into(lower[k:, k:], out[k:, k:])


def factorize(stats: Hessian, percdamp: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor of the damped H^-1 and the dead inputs, computed once per statistics object.

    H is dropped once factored: statistics shared by several matrices cost one factorisation and,
    from then on, one n x n matrix instead of two.
    """
    if stats.factor is None:
        h = stats.h.to(device)
        dead = h.diagonal() == 0  # inputs that were always zero: no information, weight irrelevant
        h.diagonal()[dead] = 1
        stats.h = None
        stats.factor, stats.dead, stats.percdamp = inverse_hessian_factor(h, percdamp), dead, percdamp
    elif stats.percdamp != percdamp:
        raise LlmpruneError(f"sparsegpt: statistics factored with dampening {stats.percdamp}, asked for {percdamp}")
    return stats.factor.to(device), stats.dead.to(device)


def _prune_block(w: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor, c0: int, c1: int,
                 sparsity: float, pattern: Pattern) -> None:
    """Prune columns c0:c1 of float32 ``w`` (out, in) in place; mark them in ``pruned``."""
    rows = w.shape[0]
    block = w[:, c0:c1].clone()  # (out, B), updated column by column
    hb = hinv[c0:c1, c0:c1]  # (B, B) upper triangular
    d = hb.diagonal()  # (B,)
    mask = pruned[:, c0:c1]  # view: True = pruned
    if pattern.kind != "nm":
        k = prune_count(rows * c1, sparsity) - prune_count(rows * c0, sparsity)
        mask.copy_(masks.lowest_k((block.square() / d.square()).reshape(-1), k).view_as(mask))
    err = torch.empty_like(block)
    # Five in-place or (out,)-sized ops per column: on CPU the per-op overhead dominates, so the
    # column loop runs on one thread; the block's trailing update below is one big matmul.
    with _one_cpu_thread(w.device):
        _columns(block, err, hb, d, mask, pattern)
    w[:, c0:c1] = block
    w[:, c1:] -= err @ hinv[c0:c1, c1:]  # the block's error, once, onto every later column


def _columns(block: torch.Tensor, err: torch.Tensor, hb: torch.Tensor, d: torch.Tensor, mask: torch.Tensor,
             pattern: Pattern) -> None:
    """The OBS column loop over one block, in place (``err`` receives each column's scaled error)."""
    for i in range(block.shape[1]):
        if pattern.kind == "nm" and i % pattern.m == 0:
            # Chosen from the weights as updated so far, as in the reference.
            group = block[:, i:i + pattern.m].square() / d[i:i + pattern.m].square()
            mask[:, i:i + pattern.m] = ~masks.n_m(group, pattern.n, pattern.m)
        e = err[:, i]
        torch.mul(block[:, i], mask[:, i], out=e)
        e /= d[i]  # (out,): the pruned part of column i, scaled by the inverse Hessian
        block[:, i:].addr_(e, hb[i, i:], alpha=-1)  # OBS update of this and later columns
        block[:, i].masked_fill_(mask[:, i], 0)  # pruned weights exactly 0, not w - (w / d) * d


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop is thousands of (out,)-sized ops: on the CPU, spreading each over threads
    costs more than it saves (5-40x slower measured on 2 busy cores)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def prune(weight: torch.Tensor, sparsity: float, pattern: Pattern, stats: Hessian | None,
          norm: str = "l1", *, percdamp: float = 0.01, blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) and update its survivors to keep W X close; input dtype out."""
    rows, cols = weight.shape
    if stats is None or stats.tokens == 0:
        raise LlmpruneError("sparsegpt needs calibration activations, but none reached this layer")
    inputs = (stats.h if stats.factor is None else stats.factor).shape[0]
    if inputs != cols:
        raise LlmpruneError(f"sparsegpt: statistics for {inputs} inputs, the weight has {cols}")
    if pattern.kind == "nm":
        if cols % pattern.m:
            raise LlmpruneError(f"input dimension {cols} is not a multiple of M={pattern.m} for N:M pruning")
        if blocksize % pattern.m:
            raise LlmpruneError(f"sparsegpt: blocksize {blocksize} is not a multiple of M={pattern.m}")
    if sparsity == 0:
        return weight.clone(), torch.ones_like(weight, dtype=torch.bool)

    hinv, dead = factorize(stats, percdamp, weight.device)
    w = weight.to(torch.float32, copy=True)
    w[:, dead] = 0

    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    for c0 in range(0, cols, blocksize):
        _prune_block(w, hinv, pruned, c0, min(c0 + blocksize, cols), sparsity, pattern)
    keep = ~pruned
    return w.to(weight.dtype).masked_fill_(~keep, 0), keep
