"""ADMM pruning (Boža, 2024; with ALPS's penalty schedule and re-fit, Meng et al., 2024).

The layer-wise problem is min ||W X - W0 X||^2 over W (out, in) with the sparsity pattern, i.e.
min tr((W - W0) H (W - W0)^T) with H = 2 X X^T / tokens, dampened as in SparseGPT (damp =
percdamp * mean(diag H)). ADMM splits it into a least-squares step and a projection:

    W = (W0 H + rho (Z - U)) (H + rho I)^-1     closed form, all rows at once
    Z = projection of W + U onto the pattern    the largest |W + U| kept
    U = U + W - Z                               scaled dual

The sparsity of Z ramps up over the first ``ramp`` iterations (cubic, as Boža), so the mask is
grown while W adapts, and rho grows geometrically, pulling W onto the sparse Z (ALPS). Then the
kept weights of the final mask are re-fit exactly: each row solves H[K, K] w_K = (W0 H)_K by
conjugate gradients, all rows batched (ALPS's PCG).

With ``normalize`` (the default) the inputs are rescaled to a unit Hessian diagonal first,
s_j = sqrt(H_jj + damp), V = W s: the same problem, but the projection then ranks |W_ij| s_j,
Wanda's score with Hessian weighting, and rho is on the scale of every input alike. One
eigendecomposition H = Q diag(l) Q^T gives (H + rho I)^-1 = Q diag(1 / (l + rho)) Q^T for every
rho; it is computed at the first ``prune`` and kept on the statistics object, which the engine
shares between matrices that read one input (q, k and v), so they cost one decomposition.

Exact counts: unstructured keeps all but round(sparsity * numel) weights of the matrix (ties to the
lower index); N:M zeroes exactly N of every M along the input dimension.

Inputs that never fired (H_jj = 0) are not zeroed up front as SparseGPT does: their Hessian row is
just the dampening, so their score is |W_ij| sqrt(damp) -- pruned early, but when kept, the re-fit
leaves them at their original value (up to the re-fit's CG tolerance), which no calibration token
can contradict. A weight that is kept but comes out exactly 0 (zero in the checkpoint already, or
underflowing the dtype) is set to the dtype's smallest normal number with its sign and a warning
counts them, so that the zeros of the returned weight are exactly the pruned ones.

``norm`` is accepted for the common interface and changes nothing for single weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import masks
from ..errors import LlmpruneError
from ..masks import Pattern, prune_count

log = logging.getLogger(__name__)

needs_calibration = True

# Defaults measured on SmolLM2-135M layers (W, H from 16 x 512 calibration tokens) at 60%: the squared
# error relative to SparseGPT's, geometric mean over five matrices, was 0.511 with these; 0.612 with
# rho 0.1 x 1.15 per step (too fast: the mask freezes early); 1.17 with rho 0.01 x 1.05 (too slow:
# the mask is still moving when ADMM stops). Below rho 0.03 the start and the ramp barely matter
# (0.511 for ramp 0, 5 or 10 at rho 0.01 x 1.1), nor do iterations past 40 (0.511 at 50 and 60).
ITERATIONS = 40  # ADMM iterations, ramp included
RAMP = 5  # iterations over which the sparsity grows to its target (0: the full target at once)
RHO_START = 0.03  # penalty at the first W-step, relative to mean(diag H)
RHO_GROWTH = 1.1  # factor per iteration: 0.03 -> 1.2 after 40 iterations
REFIT = True  # re-fit the kept weights of the final mask exactly (batched conjugate gradients)
# The re-fit matters when rho ends large (0.612 vs 0.618 without, at rho 0.1 x 1.15), hardly with
# rho 0.03 x 1.1 (0.511 vs 0.512 at 50 iterations): ADMM's last Z is then close to the least-squares
# fit of its mask. 5 CG iterations gave 0.511 too; each costs half an ADMM iteration (one matmul).
REFIT_ITERATIONS = 20  # CG iterations at most; stops earlier at REFIT_TOLERANCE
REFIT_TOLERANCE = 1e-5  # relative residual norm of the masked normal equations, over the matrix
PERCDAMP = 0.01  # dampening of H, a fraction of its mean diagonal, as SparseGPT
# On the random layers of the tests, ADMM on the raw H (projection by |W|) left 0.3-1.1x SparseGPT's
# error, 2-4x more than on the normalized one (0.17-0.29x).
NORMALIZE = True  # ADMM on inputs scaled to a unit Hessian diagonal (Wanda-like projection)


@dataclass(frozen=True)
class AdmmOptions:
    """Every knob of ADMM pruning; the defaults are the module constants above."""

    iterations: int = ITERATIONS
    ramp: int = RAMP
    rho_start: float = RHO_START
    rho_growth: float = RHO_GROWTH
    refit: bool = REFIT
    refit_iterations: int = REFIT_ITERATIONS
    refit_tolerance: float = REFIT_TOLERANCE
    percdamp: float = PERCDAMP
    normalize: bool = NORMALIZE

    def __post_init__(self) -> None:
        if self.iterations < 1 or not 0 <= self.ramp <= self.iterations:
            raise LlmpruneError(f"admm: need iterations >= 1 and 0 <= ramp <= iterations, got {self.iterations}, "
                                f"{self.ramp}")
        if self.rho_start <= 0 or self.rho_growth < 1 or self.percdamp < 0 or self.refit_iterations < 0:
            raise LlmpruneError("admm: need rho_start > 0, rho_growth >= 1, percdamp >= 0, refit_iterations >= 0")


@dataclass(frozen=True)
class Spectrum:
    """The scaled, damped Hessian with its eigendecomposition: what every matrix sharing it needs."""

    h: torch.Tensor  # (in, in) (H + damp I) / (s s^T)
    q: torch.Tensor  # (in, in) eigenvectors, columns
    l: torch.Tensor  # (in,) eigenvalues, >= 0
    scale: torch.Tensor  # (in,) s: V = W * s
    unit: float  # mean diagonal of h: rho is relative to it
    percdamp: float
    normalize: bool

    def shifted_solve(self, rhs: torch.Tensor, rho: float) -> torch.Tensor:
        """rhs (h + rho I)^-1 for row-form ``rhs`` (out, in): two matmuls, no factorisation."""
        return ((rhs @ self.q) / (self.l + rho)) @ self.q.mT


@dataclass
class Hessian:
    """Running average of 2 x x^T over tokens, (in, in) float32; replaced by ``spectrum`` at the first prune."""

    h: torch.Tensor | None
    tokens: int = 0
    spectrum: Spectrum | None = None


def init_stats(weight: torch.Tensor) -> Hessian:
    n = weight.shape[1]
    return Hessian(torch.zeros(n, n, dtype=torch.float32, device=weight.device))


def stats_bytes(out_features: int, in_features: int) -> int:
    """Peak float32 memory for one (out, in) matrix.

    The eigendecomposition holds H, its eigenvectors and LAPACK's 2 n^2 workspace (4 n^2); ADMM
    then holds H and the eigenvectors and about eight (out, in) iterates and temporaries.
    """
    n2, w = in_features * in_features, out_features * in_features
    return 4 * max(4 * n2, 2 * n2 + 8 * w)


@torch.no_grad()
def accumulate(stats: Hessian, x: torch.Tensor) -> None:
    """Fold a batch of layer inputs ``x`` (tokens, in) into H; leading batch dims are flattened."""
    x = x.reshape(-1, x.shape[-1])
    if stats.h is None:
        raise LlmpruneError("admm: statistics already used for pruning cannot take more activations")
    if x.shape[1] != stats.h.shape[0]:
        raise LlmpruneError(f"admm: activations have {x.shape[1]} features, the layer takes {stats.h.shape[0]}")
    if x.shape[0] == 0:
        return
    total = stats.tokens + x.shape[0]
    stats.h *= stats.tokens / total  # an average, not a sum: bounded however many batches arrive
    x = x.to(stats.h.device, torch.float32)
    stats.h.addmm_(x.t(), x, alpha=2 / total)
    stats.tokens = total


def spectrum(stats: Hessian, percdamp: float, normalize: bool, device: torch.device) -> Spectrum:
    """Scale, dampen and decompose H once per statistics object; H itself is dropped (overwritten)."""
    if stats.spectrum is None:
        h = stats.h.to(device)
        stats.h = None
        if not torch.isfinite(h).all():
            raise LlmpruneError("admm: the Hessian has non-finite entries (inf or NaN calibration activations)")
        mean_diag = float(h.diagonal().mean())
        h.diagonal().add_(percdamp * mean_diag if mean_diag > 0 else 1.0)
        scale = h.diagonal().sqrt() if normalize else torch.ones(h.shape[0], device=device)
        h.div_(scale[:, None]).div_(scale[None, :])
        l, q = torch.linalg.eigh(h)
        stats.spectrum = Spectrum(h, q, l.clamp_min_(0), scale, float(h.diagonal().mean()), percdamp, normalize)
    got = stats.spectrum
    if (got.percdamp, got.normalize) != (percdamp, normalize):
        raise LlmpruneError(f"admm: statistics prepared with percdamp={got.percdamp}, normalize={got.normalize}; "
                            f"asked for percdamp={percdamp}, normalize={normalize}")
    if got.h.device != device:
        got = Spectrum(got.h.to(device), got.q.to(device), got.l.to(device), got.scale.to(device), got.unit,
                       got.percdamp, got.normalize)
    return got


def project(v: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of the largest |v| at ``sparsity``: per matrix, or within the final N:M mask.

    For N:M below N/M (the ramp), the pruned weights are the lowest of those the full N:M mask
    would prune, so every group always has at most N zeros.
    """
    scores = v.abs()
    if pattern.kind != "nm":
        return masks.select(scores, sparsity, pattern)
    keep = masks.n_m(scores, pattern.n, pattern.m)
    k = prune_count(v.numel(), sparsity)
    if k >= int((~keep).sum()):
        return keep
    pruned = masks.lowest_k(scores.masked_fill_(keep, float("inf")).reshape(-1), k)
    return ~pruned.view_as(v)


def ramp_sparsity(iteration: int, sparsity: float, ramp: int) -> float:
    """The sparsity at 0-based ``iteration``: cubic growth to ``sparsity`` at iteration ramp - 1."""
    if iteration >= ramp - 1:
        return sparsity
    return sparsity * (1 - (1 - (iteration + 1) / ramp) ** 3)


@dataclass(frozen=True)
class State:
    """One ADMM iterate, in the scaled variables: ``z`` is zero exactly where ``keep`` is False."""

    iteration: int
    sparsity: float
    rho: float
    z: torch.Tensor  # (out, in)
    keep: torch.Tensor  # (out, in) bool


def iterate(v0: torch.Tensor, spec: Spectrum, sparsity: float, pattern: Pattern, *, iterations: int = ITERATIONS,
            ramp: int = RAMP, rho_start: float = RHO_START, rho_growth: float = RHO_GROWTH) -> Iterator[State]:
    """ADMM on min tr((V - V0) h (V - V0)^T) s.t. the pattern; one State per iteration, the last at ``sparsity``."""
    target = v0 @ spec.h  # (out, in): V0 h, the least-squares right-hand side
    v, u, z = v0, torch.zeros_like(v0), v0  # z: the last projection (set at iteration 0)
    rho = rho_start * spec.unit
    for it in range(iterations):
        if it:
            v = spec.shifted_solve(target + rho * (z - u), rho)
        current = ramp_sparsity(it, sparsity, ramp) if it < iterations - 1 else sparsity
        vu = v + u
        keep = project(vu, current, pattern)
        z = vu.masked_fill_(~keep, 0)
        u += v - z
        yield State(it, current, rho, z, keep)
        u *= 1 / rho_growth  # the scaled dual U = Y / rho follows rho (Boyd et al., 3.4.1)
        rho *= rho_growth


def refit(v: torch.Tensor, keep: torch.Tensor, spec: Spectrum, target: torch.Tensor, *,
          iterations: int = REFIT_ITERATIONS, tolerance: float = REFIT_TOLERANCE) -> torch.Tensor:
    """The least-squares kept weights of every row, h[K, K] v_K = target_K, by batched preconditioned CG.

    Each row is its own CG (its own step sizes) on the masked operator P h P; the rows share one
    (out, in) x (in, in) matmul per iteration. ``v`` (zero off ``keep``) is the starting point.
    """
    inv_diag = spec.h.diagonal().reciprocal()  # Jacobi preconditioner (1 when normalized)
    x = v.clone()
    r = (target - x @ spec.h).masked_fill_(~keep, 0)
    stop = tolerance * float(torch.linalg.vector_norm(target.masked_fill(~keep, 0)))
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(dim=1, keepdim=True)
    for _ in range(iterations):
        if float(torch.linalg.vector_norm(r)) <= stop:
            break
        ap = (p @ spec.h).masked_fill_(~keep, 0)
        pap = (p * ap).sum(dim=1, keepdim=True)
        alpha = torch.where(pap > 0, rz / pap, 0.0)  # converged rows: p = 0, no step
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        z = r * inv_diag
        rz_next = (r * z).sum(dim=1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz, 0.0)
        p = z.addcmul_(beta, p)
        rz = rz_next
    return x


def _check(weight: torch.Tensor, pattern: Pattern, stats: Hessian | None) -> None:
    if stats is None or stats.tokens == 0:
        raise LlmpruneError("admm needs calibration activations, but none reached this layer")
    inputs = (stats.h if stats.spectrum is None else stats.spectrum.h).shape[0]
    if inputs != weight.shape[1]:
        raise LlmpruneError(f"admm: statistics for {inputs} inputs, the weight has {weight.shape[1]}")
    if pattern.kind == "nm" and weight.shape[1] % pattern.m:
        raise LlmpruneError(f"input dimension {weight.shape[1]} is not a multiple of M={pattern.m} for N:M pruning")
    if pattern.kind not in ("unstructured", "nm"):
        raise LlmpruneError(f"admm: pattern {pattern} is not supported (unstructured or N:M)")


def _no_kept_zeros(w: torch.Tensor, keep: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Kept weights that are exactly 0 become the dtype's smallest normal, signed: zeros = pruned."""
    lost = keep & (w == 0)
    count = int(lost.sum())
    if count:
        log.warning("admm: %d kept weights were exactly 0; set to +-%g so that they stay counted as kept",
                    count, torch.finfo(w.dtype).tiny)
        tiny = torch.full_like(w, torch.finfo(w.dtype).tiny).copysign_(signs.to(w.dtype))
        w = torch.where(lost, tiny, w)
    return w


@torch.no_grad()
def prune(weight: torch.Tensor, sparsity: float, pattern: Pattern, stats: Hessian | None, norm: str = "l1",
          options: AdmmOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) by ADMM and re-fit its survivors to keep W X close; input dtype out."""
    opts = options or AdmmOptions()
    _check(weight, pattern, stats)
    if sparsity == 0:
        return weight.clone(), torch.ones_like(weight, dtype=torch.bool)
    final = pattern.sparsity if pattern.kind == "nm" else sparsity

    spec = spectrum(stats, opts.percdamp, opts.normalize, weight.device)
    v0 = weight.to(torch.float32) * spec.scale  # (out, in), scaled inputs
    for state in iterate(v0, spec, final, pattern, iterations=opts.iterations, ramp=opts.ramp,
                         rho_start=opts.rho_start, rho_growth=opts.rho_growth):
        pass
    v, keep = state.z, state.keep
    if opts.refit:
        v = refit(v, keep, spec, v0 @ spec.h, iterations=opts.refit_iterations, tolerance=opts.refit_tolerance)
    w = (v / spec.scale).masked_fill_(~keep, 0)
    out = w.to(weight.dtype).masked_fill_(~keep, 0)
    return _no_kept_zeros(out, keep, torch.where(w == 0, weight.float(), w).sign()), keep


class Configured:
    """This criterion with ``options`` fixed (the engine calls ``prune`` without them); every other
    attribute is the module's."""

    def __init__(self, options: AdmmOptions):
        self.options = options

    def __getattr__(self, name: str):
        return globals()[name] if name in globals() else super().__getattribute__(name)

    def prune(self, weight: torch.Tensor, sparsity: float, pattern: Pattern, stats: Hessian | None,
              norm: str = "l1") -> tuple[torch.Tensor, torch.Tensor]:
        return prune(weight, sparsity, pattern, stats, norm, self.options)
