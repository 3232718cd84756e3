"""Re-fitting a linear after structured removal of its inputs, and ranking the units to remove.

The consuming ("readout") linear W (out, n) reads X (n, T). Removing a unit removes a set S of its
input columns (a whole MLP channel feeding down_proj, a head's head_dim columns of o_proj). The
kept columns K are re-fitted to the original output by least squares on H = X X^T / T:

    W'_K = W H[:, K] H[K, K]^-1 = W_K + W_R H[R, K] H[K, K]^-1           (SlimGPT, ZipLM)

H is dampened as in SparseGPT: H + lambda I with lambda = percdamp * mean(diag H), which turns the
problem into a ridge regression towards the original weights, min ||W X - W' X_K||^2 / T +
lambda ||W_K - W'_K||^2; percdamp = 0 gives the plain least squares. Inputs that never fired
(H_jj = 0) get H_jj = 1, as in SparseGPT: they are uncorrelated with the rest, so their kept
weights are left as they are, and removing them costs nothing.

Ranking. With the dampened inverse H^-1, removing unit S alone and re-fitting the rest raises the
layer's squared error (summed over output rows, in the units of H: a mean over tokens for
``InputMoments.hessian``) by the OBS cost sum_rows w_S^T ((H^-1)_SS)^-1 w_S. ``greedy_removal`` is
ZipLM's loop: remove the cheapest unit, update the kept weights and downdate H^-1 (the inverse of
a principal submatrix is the Schur complement in the inverse), rescore. FLAP (An et al., 2024)
scores by fluctuation, var(X_j) ||W[:, j]||^2, and compensates the removed columns' mean
contribution through the bias; ``output_energy`` is the Wanda-style ||W_S X_S||^2 already used for
structured pruning, for comparison.

Units are given as ``columns``, an int64 (units, w) tensor: the w input columns of each unit, all
units of one width (``structured.unit_columns`` builds it from ``arch.Units.readout``). Everything
here is float32 on the weight's device, deterministic (ties go to the lower unit index) and never
modifies its arguments. No model, config or file is seen: one weight and its input statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import LlmpruneError

log = logging.getLogger(__name__)

_DAMP_RETRIES = 4  # as sparsegpt: dampening grows tenfold per retry when the matrix is not positive definite


class InputMoments:
    """Running first and second moments of a linear's input, over tokens, in float32.

    Kept as the mean (n,) and the centred covariance (n, n), both averages over the tokens seen,
    merged batch by batch with Chan et al.'s pairwise update. The centred form keeps the variance
    exact when the mean is large against the spread (LLM activations have channels like that, where
    E[x^2] - E[x]^2 in float32 loses every digit); X X^T / T is rebuilt from it by an addition of
    two positive semi-definite matrices, which loses nothing. Memory: one (n, n) matrix, plus a
    centred float32 copy of each batch while it is added.
    """

    def __init__(self, features: int, device: torch.device | str | None = None):
        self.tokens = 0
        self._mean = torch.zeros(features, dtype=torch.float32, device=device)  # (n,)
        self._cov = torch.zeros(features, features, dtype=torch.float32, device=device)  # (n, n)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch ``x`` (..., n); leading dims are tokens."""
        n = self._mean.shape[0]
        if x.shape[-1] != n:
            raise LlmpruneError(f"reconstruct: activations have {x.shape[-1]} features, the statistics take {n}")
        x = x.reshape(-1, n)
        m = x.shape[0]
        if m == 0:
            return
        x = x.to(self._mean.device, torch.float32, copy=True)  # (m, n), centred in place below
        batch_mean = x.mean(0)  # (n,)
        x -= batch_mean
        total = self.tokens + m
        delta = batch_mean - self._mean  # (n,)
        self._cov *= self.tokens / total
        self._cov.addmm_(x.t(), x, alpha=1 / total)
        self._cov.addr_(delta, delta, alpha=self.tokens * m / total**2)
        self._mean.add_(delta, alpha=m / total)
        self.tokens = total

    def _check(self) -> None:
        if self.tokens == 0:
            raise LlmpruneError("reconstruct needs calibration activations, but none reached this layer")

    @property
    def mean(self) -> torch.Tensor:
        """E[x], (n,); the live buffer, not a copy."""
        self._check()
        return self._mean

    @property
    def covariance(self) -> torch.Tensor:
        """E[(x - E x)(x - E x)^T], (n, n); the live buffer, not a copy. Re-fitting on it instead
        of ``hessian`` gives the least squares with an intercept (see ``bias_compensation``)."""
        self._check()
        return self._cov

    @property
    def variance(self) -> torch.Tensor:
        """Per-feature variance over tokens (divided by T, not T - 1), (n,); a view of the covariance."""
        self._check()
        return self._cov.diagonal()

    @property
    def hessian(self) -> torch.Tensor:
        """X X^T / T, (n, n): a new matrix on each access."""
        self._check()
        return torch.addr(self._cov, self._mean, self._mean)

    def gram_blocks(self, columns: torch.Tensor) -> torch.Tensor:
        """The (units, w, w) diagonal blocks of ``hessian`` for ``columns`` (units, w), without
        building the whole matrix."""
        self._check()
        c = columns.to(self._cov.device)
        mu = self._mean[c]  # (units, w)
        return self._cov[c[:, :, None], c[:, None, :]] + mu[:, :, None] * mu[:, None, :]


Stats = InputMoments | torch.Tensor  # the moments, or a ready (n, n) Hessian X X^T / T (or any multiple)


def _hessian(stats: Stats, n: int, device: torch.device) -> torch.Tensor:
    """A fresh float32 (n, n) copy of H on ``device``, checked."""
    h = stats.hessian if isinstance(stats, InputMoments) else stats
    if h.shape != (n, n):
        raise LlmpruneError(f"reconstruct: statistics of shape {tuple(h.shape)} for a weight with {n} inputs")
    h = h.to(device, torch.float32, copy=not isinstance(stats, InputMoments))
    if not torch.isfinite(h).all():
        raise LlmpruneError("reconstruct: the Hessian has non-finite entries (inf or NaN calibration activations)")
    return h


def _prepare(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mark dead inputs of ``h`` (n, n) in place (H_jj := 1); return h, the dead mask (n,) and the
    dampening scale mean(diag H), taken over all n inputs whatever block is factored later."""
    dead = h.diagonal() == 0  # (n,) inputs that were always zero
    h.diagonal()[dead] = 1
    return h, dead, float(h.diagonal().mean())


def _cholesky(a: torch.Tensor, scale: float, percdamp: float, what: str) -> torch.Tensor:
    """Lower Cholesky factor of ``a`` + percdamp * scale * I, ``a`` (k, k) modified in place (its
    diagonal is dampened). A non-positive-definite matrix is retried with tenfold dampening, as in
    sparsegpt."""
    fracs = [percdamp] + [max(percdamp, 1e-3) * 10**i for i in range(1, _DAMP_RETRIES + 1)]
    added = 0.0
    for attempt, frac in enumerate(fracs):
        if attempt:
            log.warning("reconstruct: %s not positive definite with dampening %.3g; retrying with %.3g",
                        what, fracs[attempt - 1], frac)
        a.diagonal().add_(frac * scale - added)
        added = frac * scale
        lower, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return lower
    raise LlmpruneError(f"reconstruct: {what} not positive definite even with dampening {fracs[-1]:.3g}")


def _index(keep: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Column indices (k,) int64 from a bool mask (n,) or indices (any shape), checked."""
    keep = keep.to(device)
    if keep.dtype == torch.bool:
        if keep.shape != (n,):
            raise LlmpruneError(f"reconstruct: a keep mask of shape {tuple(keep.shape)} for {n} inputs")
        return torch.nonzero(keep).squeeze(1)
    keep = keep.reshape(-1).long()
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= n):
        raise LlmpruneError(f"reconstruct: column indices outside 0..{n - 1}")
    if torch.unique(keep).numel() != keep.numel():
        raise LlmpruneError("reconstruct: repeated column indices")
    return keep


def _complement(index: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted columns of 0..n-1 not in ``index``, (n - k,)."""
    mask = torch.ones(n, dtype=torch.bool, device=index.device)
    mask[index] = False
    return torch.nonzero(mask).squeeze(1)


@torch.no_grad()
def refit(weight: torch.Tensor, stats: Stats, keep: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The least-squares kept columns of ``weight`` (out, n) once the others are removed.

    ``keep``: a bool mask (n,) or column indices (k,); the result (out, k) follows their order
    (ascending for a mask), in ``weight``'s dtype: W_K + W_R H_RK (H_KK + lambda I)^-1.
    """
    out, n = weight.shape
    keep = _index(keep, n, weight.device)  # (k,)
    removed = _complement(keep, n)  # (r,)
    h, _, scale = _prepare(_hessian(stats, n, weight.device))
    w = weight.float()  # (out, n); not written to
    h_keep = h[keep]  # (k, n)
    del h
    rhs = h_keep[:, removed] @ w[:, removed].t()  # (k, out): H_KR W_R^T
    lower = _cholesky(h_keep[:, keep], scale, percdamp, "H of the kept inputs")  # (k, k)
    delta = torch.cholesky_solve(rhs, lower)  # (k, out)
    return (w[:, keep] + delta.t()).to(weight.dtype)


@torch.no_grad()
def removal_error(weight: torch.Tensor, stats: Stats, keep: torch.Tensor, refitted: bool = True,
                  percdamp: float = 0.01) -> float:
    """The mean squared output error per token, tr(D H D^T) with H = X X^T / T, that removing every
    input column of ``weight`` (out, n) not in ``keep`` leaves: with ``refitted``, after the kept
    columns take their least-squares ``refit`` (dampened as there, the error measured undampened);
    otherwise with the kept columns unchanged. ``keep``: a bool mask (n,) or column indices.
    """
    out, n = weight.shape
    keep = _index(keep, n, weight.device)
    removed = _complement(keep, n)
    w = weight.float()
    delta = torch.zeros_like(w)  # (out, n): the change of the weight, removed columns set to zero
    delta[:, removed] = -w[:, removed]
    if refitted and keep.numel() and removed.numel():
        delta[:, keep] = refit(weight, stats, keep, percdamp).float() - w[:, keep]
    h = _hessian(stats, n, weight.device)
    return float(((delta @ h) * delta).sum())


def bias_compensation(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor,
                      new_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The (out,) vector to add to the linear's bias so that its mean output is unchanged (FLAP).

    Without ``new_weight`` it is the removed columns' mean contribution W[:, R] @ E[x_R], for kept
    columns left as they are. With ``new_weight`` (out, k), the re-fitted kept columns in ascending
    order, it is W @ E[x] - W' @ E[x_K]; together with a ``refit`` on ``InputMoments.covariance``
    that is the exact least squares with an intercept. ``removed``: a bool mask (n,) or indices.

    It applies where the family's readout linear has a bias (OPT's fc2 and out_proj, GPT-2's c_proj)
    or can be given one; Llama-style down_proj and o_proj have none, and a config would have to
    allow it (``mlp_bias`` / ``attention_bias``, which also add biases elsewhere). float32, (out,).
    """
    out, n = weight.shape
    removed = _index(removed, n, weight.device)
    w, mu = weight.float(), mean.to(weight.device, torch.float32)  # (out, n), (n,)
    if mu.shape != (n,):
        raise LlmpruneError(f"reconstruct: a mean of shape {tuple(mu.shape)} for a weight with {n} inputs")
    if new_weight is None:
        return w[:, removed] @ mu[removed]
    keep = _complement(removed, n)
    if new_weight.shape != (out, keep.numel()):
        raise LlmpruneError(f"reconstruct: new weight of shape {tuple(new_weight.shape)}, "
                            f"expected {(out, keep.numel())}")
    return w @ mu - new_weight.float() @ mu[keep]


def _check_columns(columns: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if columns.dim() != 2:
        raise LlmpruneError(f"reconstruct: unit columns must be (units, width), got shape {tuple(columns.shape)}")
    _index(columns, n, device)  # in range and disjoint
    return columns.to(device).long()


@torch.no_grad()
def inverse_hessian(stats: Stats, n: int, device: torch.device,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The dampened H^-1 (n, n) float32 and the dead inputs (n,) bool. Working memory: two n x n."""
    h, dead, scale = _prepare(_hessian(stats, n, device))
    lower = _cholesky(h, scale, percdamp, "H")
    del h
    return torch.cholesky_inverse(lower), dead


def _block_inverse(hinv: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """((H^-1)_SS)^-1 for each unit, (units, w, w), symmetrised against float drift."""
    blocks = hinv[columns[:, :, None], columns[:, None, :]]  # (units, w, w)
    blocks = (blocks + blocks.mT) / 2
    lower, info = torch.linalg.cholesky_ex(blocks)
    if bool((info != 0).any()):
        raise LlmpruneError("reconstruct: a block of H^-1 is not positive definite; raise percdamp")
    return torch.cholesky_inverse(lower)


def _unit_costs(w: torch.Tensor, hinv: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """OBS cost of each unit of ``columns`` (units, w) for ``w`` (out, n): (units,) float32."""
    m = _block_inverse(hinv, columns)  # (units, w, w)
    ws = w[:, columns]  # (out, units, w)
    return (torch.einsum("ous,usv->ouv", ws, m) * ws).sum(dim=(0, 2))


@torch.no_grad()
def obs_costs(weight: torch.Tensor, stats: Stats, columns: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Each unit's OBS/ZipLM removal cost, sum over rows of w_S^T ((H^-1)_SS)^-1 w_S: (units,) float32.

    It is exactly the rise in the (dampened) squared error of ``weight`` (out, n) when that unit
    alone is removed and every other column optimally re-fitted. Dead inputs cost nothing.
    """
    n = weight.shape[1]
    columns = _check_columns(columns, n, weight.device)
    hinv, dead = inverse_hessian(stats, n, weight.device, percdamp)
    return _unit_costs(weight.float().masked_fill(dead, 0), hinv, columns)


@dataclass(frozen=True)
class Removal:
    """What ``greedy_removal`` decided, and the re-fitted weight."""
    removed: torch.Tensor  # (steps,) int64: units in the order they were removed
    costs: torch.Tensor  # (steps,) float32: each step's cost; they sum to the rise of the dampened objective
    keep: torch.Tensor  # (k,) int64: the kept input columns, ascending
    weight: torch.Tensor  # (out, k): the re-fitted kept columns, in the input weight's dtype


@torch.no_grad()
def greedy_removal(weight: torch.Tensor, stats: Stats, columns: torch.Tensor, k: int, percdamp: float = 0.01,
                   blocks: int = 1) -> Removal:
    """ZipLM: remove ``k`` units from each of ``blocks`` blocks, one at a time, cheapest OBS cost first.

    Units are split into ``blocks`` consecutive blocks of equal size (query heads within their KV
    group; one block for MLP channels), as in ``masks.units``; a block that has lost ``k`` units
    offers no more. After each removal of S the kept weights take the OBS update
    W -= W_S ((H^-1)_SS)^-1 (H^-1)_S: and H^-1 is downdated the same way, so it stays the inverse
    of the kept inputs' dampened H. The final weight equals ``refit`` on the final keep set (same
    dampening). Cost per step: O((out + n) n w) on the weight's device; float32 throughout.
    """
    out, n = weight.shape
    columns = _check_columns(columns, n, weight.device)
    units, width = columns.shape
    if blocks < 1 or units % blocks:
        raise LlmpruneError(f"reconstruct: {units} units do not split into {blocks} equal blocks")
    per_block = units // blocks
    if not 0 <= k < per_block:
        raise LlmpruneError(f"reconstruct: cannot remove {k} of {per_block} units per block")
    hinv, dead = inverse_hessian(stats, n, weight.device, percdamp)  # (n, n), (n,)
    w = weight.float().masked_fill(dead, 0)  # (out, n); dead columns never move and are put back below
    block_of = torch.arange(units, device=weight.device) // per_block  # (units,)
    taken = torch.zeros(blocks, dtype=torch.long, device=weight.device)  # units removed per block
    alive = torch.ones(units, dtype=torch.bool, device=weight.device)
    removed, costs = [], []
    for _ in range(k * blocks):
        candidates = torch.nonzero(alive & (taken[block_of] < k)).squeeze(1)  # ascending
        cost = _unit_costs(w, hinv, columns[candidates])
        best = int(torch.argmin(cost))  # the first minimum: ties go to the lower unit index
        unit = int(candidates[best])
        s = columns[unit]  # (w,)
        m = _block_inverse(hinv, s[None])[0]  # (w, w)
        row = hinv[s]  # (w, n), a copy
        w.addmm_(w[:, s] @ m, row, alpha=-1)  # OBS update of all columns; W_S becomes ~0
        hinv.addmm_(row.t() @ m, row, alpha=-1)  # Schur downdate (H^-1 symmetric: H^-1[:, S] = row^T)
        w[:, s] = 0
        hinv[s] = 0
        hinv[:, s] = 0
        alive[unit] = False
        taken[unit // per_block] += 1
        removed.append(unit)
        costs.append(cost[best])
    w[:, dead] = weight[:, dead].float()
    keep = _complement(columns[~alive].reshape(-1), n)
    return Removal(torch.tensor(removed, dtype=torch.long, device=weight.device),
                   torch.stack(costs) if costs else torch.zeros(0, device=weight.device),
                   keep, w[:, keep].to(weight.dtype))


@torch.no_grad()
def fluctuation(weight: torch.Tensor, variance: torch.Tensor | InputMoments, columns: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation score per unit, sum over its columns of var(x_j) ||W[:, j]||^2: (units,) float32.

    ``variance`` (n,) is per input over tokens (or the ``InputMoments`` to take it from). It is the
    squared error the unit's removal leaves once its mean is compensated through the bias and
    nothing else is re-fitted, counting only each column's own variance (no covariances).
    """
    n = weight.shape[1]
    columns = _check_columns(columns, n, weight.device)
    var = variance.variance if isinstance(variance, InputMoments) else variance
    if var.shape != (n,):
        raise LlmpruneError(f"reconstruct: a variance of shape {tuple(var.shape)} for a weight with {n} inputs")
    per_column = var.to(weight.device, torch.float32) * weight.float().square().sum(0)  # (n,)
    return per_column[columns].sum(1)


@torch.no_grad()
def output_energy(weight: torch.Tensor, stats: Stats, columns: torch.Tensor) -> torch.Tensor:
    """||W_S X_S||^2 per unit, sum over rows of w_S^T H_SS w_S, in the units of H: (units,) float32.

    The squared score structured pruning ranks by today (``UnitGram.output_norms`` is its square
    root, with H a sum over tokens); the error of dropping the unit with nothing re-fitted.
    """
    n = weight.shape[1]
    columns = _check_columns(columns, n, weight.device)
    if isinstance(stats, InputMoments):
        gram = stats.gram_blocks(columns).to(weight.device)  # (units, w, w)
    else:
        if stats.shape != (n, n):
            raise LlmpruneError(f"reconstruct: statistics of shape {tuple(stats.shape)} for a weight with {n} inputs")
        h = stats.to(weight.device)
        gram = h[columns[:, :, None], columns[:, None, :]].float()
    ws = weight.float()[:, columns]  # (out, units, w)
    return (torch.einsum("ous,usv->ouv", ws, gram) * ws).sum(dim=(0, 2))
