"""Re-fitting after structured removal: checked against float64 least squares done by brute force."""

import pytest
import torch

from llmprune.errors import LlmpruneError
from llmprune.reconstruct import (InputMoments, bias_compensation, fluctuation, greedy_removal, obs_costs,
                                  output_energy, refit)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N, OUT, TOKENS, WIDTH = 12, 6, 400, 2
COLUMNS = torch.arange(N).view(-1, WIDTH)  # (6 units, 2 columns)


def problem(seed=0, mean=0.0):
    """W (out, n) and X (n, T) in float64, X = Z + 2 B F: every column shares three latent factors."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, TOKENS, generator=g, dtype=torch.float64)
    mix = torch.randn(N, 3, generator=g, dtype=torch.float64)
    factors = torch.randn(3, TOKENS, generator=g, dtype=torch.float64)
    x = z + 2 * mix @ factors + mean
    return torch.randn(OUT, N, generator=g, dtype=torch.float64), x


def hessian(x):
    return (x @ x.T / x.shape[1]).float()


def lstsq_refit(w, x, keep):
    """argmin over W' of ||W X - W' X_K||, (out, k) float64."""
    return torch.linalg.lstsq(x[keep].T, (w @ x).T).solution.T


def error(w, x, new, keep):
    """Mean over tokens of the squared output error, summed over rows."""
    return float(((w @ x - new.double() @ x[keep]) ** 2).sum()) / x.shape[1]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def without(unit_list):
    gone = set(COLUMNS[unit_list].reshape(-1).tolist())
    return torch.tensor([j for j in range(N) if j not in gone])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep", [[0, 1, 2, 3, 4, 5, 6, 7], [11, 3, 7, 0], list(range(1, N))])
def test_refit_is_least_squares(device, keep):
    w, x = problem()
    keep = torch.tensor(keep)
    got = refit(w.float().to(device), hessian(x).to(device), keep.to(device), percdamp=0)
    assert got.shape == (OUT, len(keep)) and got.dtype == torch.float32 and got.device.type == device
    assert rel(got.cpu(), lstsq_refit(w, x, keep)) < 1e-4


def test_refit_takes_a_mask_and_keeps_the_dtype():
    w, x = problem()
    mask = torch.zeros(N, dtype=torch.bool)
    mask[[1, 4, 9]] = True
    got = refit(w.to(torch.bfloat16), hessian(x), mask, percdamp=0)
    assert got.dtype == torch.bfloat16
    assert rel(got, lstsq_refit(w, x, torch.tensor([1, 4, 9]))) < 1e-2  # bf16 rounding of W and W'


@pytest.mark.parametrize("percdamp", [0, 0.01])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_beats_dropping(percdamp, seed):
    w, x = problem(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        keep = torch.sort(torch.randperm(N, generator=g)[:7]).values
        fitted = error(w, x, refit(w.float(), hessian(x), keep, percdamp), keep)
        dropped = error(w, x, w[:, keep], keep)
        best = error(w, x, lstsq_refit(w, x, keep), keep)
        assert fitted < 0.8 * dropped
        assert fitted <= best * (1 + (1e-4 if percdamp == 0 else 0.05))


def test_dampening_is_ridge_towards_the_original_weights():
    """With lambda = percdamp * mean(diag H): min ||W X - W' X_K||^2 / T + lambda ||W_K - W'_K||^2."""
    w, x = problem()
    keep, h = without([1, 4]), hessian(x)
    lam = 0.05 * float(h.diagonal().mean())
    xk = x[keep]
    # Normal equations: W'(H_KK + lam I) = W H[:, K] + lam W_K.
    hk = xk @ xk.T / TOKENS
    want = torch.linalg.solve(hk + lam * torch.eye(len(keep), dtype=torch.float64),
                              (w @ x @ xk.T / TOKENS + lam * w[:, keep]).T).T
    assert rel(refit(w.float(), h, keep, percdamp=0.05), want) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_moments_over_batches_equal_one_shot(device):
    _, x = problem(mean=3.0)
    t = x.T.float()  # (T, n)
    batches = [t[:100].view(2, 50, N), t[100:100], t[100:150].to(torch.bfloat16), t[150:]]  # (..., n), any size
    moments = InputMoments(N, device)
    for batch in batches:
        moments.add(batch.to(device))
    seen = torch.cat([b.reshape(-1, N).double() for b in batches])  # (T, n)
    assert moments.tokens == TOKENS and seen.shape == (TOKENS, N)
    assert rel(moments.hessian.cpu(), seen.T @ seen / TOKENS) < 1e-6
    assert rel(moments.mean.cpu(), seen.mean(0)) < 1e-6
    assert rel(moments.variance.cpu(), seen.var(0, correction=0)) < 1e-5
    assert rel(moments.covariance.cpu(), torch.cov(seen.T, correction=0)) < 1e-5


def test_moments_variance_survives_a_large_mean():
    """x = 1000 + noise: E[x^2] - E[x]^2 in float32 would lose the variance; the centred merge does not."""
    g = torch.Generator().manual_seed(0)
    x = 1000 + torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.1, 0.01])
    moments = InputMoments(3)
    for batch in x.float().split(128):
        moments.add(batch)
    assert rel(moments.variance, x.var(0, correction=0)) < 1e-3
    assert float((moments.variance.double() / x.var(0, correction=0) - 1).abs().max()) < 1e-3


def test_moments_refuse_bad_input():
    moments = InputMoments(4)
    with pytest.raises(LlmpruneError, match="none reached"):
        _ = moments.hessian
    with pytest.raises(LlmpruneError, match="5 features"):
        moments.add(torch.zeros(3, 5))


def test_bias_compensation_zeroes_the_mean_error():
    w, x = problem(mean=2.0)
    bias = torch.randn(OUT, dtype=torch.float64)
    mean = x.mean(1).float()
    removed = torch.tensor([2, 3, 8, 9])
    keep = without([1, 4])
    c = bias_compensation(w.float(), mean, removed)
    before = (w @ x + bias[:, None]).mean(1)
    plain = (w[:, keep] @ x[keep] + bias[:, None]).mean(1)
    assert float((before - plain).abs().max()) > 1  # the removed columns carried a real mean
    assert float((before - (plain + c.double())).abs().max()) < 1e-4
    mask = torch.zeros(N, dtype=torch.bool)
    mask[removed] = True
    assert torch.equal(bias_compensation(w.float(), mean, mask), c)


def test_refit_on_covariance_with_bias_is_least_squares_with_intercept():
    w, x = problem(mean=2.0)
    moments = InputMoments(N)
    moments.add(x.T.float())
    removed, keep = COLUMNS[[1, 4]].reshape(-1), without([1, 4])
    new = refit(w.float(), moments.covariance, keep, percdamp=0)
    c = bias_compensation(w.float(), moments.mean, removed, new_weight=new)
    design = torch.cat([x[keep], torch.ones(1, TOKENS, dtype=torch.float64)])  # (k + 1, T)
    sol = torch.linalg.lstsq(design.T, (w @ x).T).solution.T  # (out, k + 1)
    assert rel(new, sol[:, :-1]) < 1e-4
    assert rel(c, sol[:, -1]) < 1e-4
    residual = w @ x - (new.double() @ x[keep] + c.double()[:, None])
    assert float(residual.mean(1).abs().max()) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_obs_cost_is_the_error_of_removing_the_unit_alone(device):
    w, x = problem()
    moments = InputMoments(N, device)
    moments.add(x.T.float().to(device))
    costs = obs_costs(w.float().to(device), moments, COLUMNS.to(device), percdamp=0).cpu()
    brute = torch.tensor([error(w, x, lstsq_refit(w, x, without([u])), without([u])) for u in range(len(COLUMNS))])
    assert rel(costs, brute) < 1e-4
    assert float(brute.max()) > 2 * float(brute.min())  # the units differ: the ranking means something


def test_dampened_obs_cost_is_the_dampened_objective_of_refit():
    w, x = problem()
    h = hessian(x)
    lam = 0.1 * float(h.diagonal().mean())
    costs = obs_costs(w.float(), h, COLUMNS, percdamp=0.1)
    for u in range(len(COLUMNS)):
        keep = without([u])
        new = refit(w.float(), h, keep, percdamp=0.1).double()
        objective = error(w, x, new, keep) + lam * float(((w[:, keep] - new) ** 2).sum())
        objective += lam * float((w[:, COLUMNS[u]] ** 2).sum())  # the removed weights go to zero too
        assert float(costs[u]) == pytest.approx(objective, rel=1e-4)


def test_greedy_first_choice_is_the_brute_force_best():
    w, x = problem(seed=3)
    result = greedy_removal(w.float(), hessian(x), COLUMNS, k=1, percdamp=0)
    brute = [error(w, x, lstsq_refit(w, x, without([u])), without([u])) for u in range(len(COLUMNS))]
    best = min(range(len(brute)), key=brute.__getitem__)
    assert result.removed.tolist() == [best]
    assert float(result.costs[0]) == pytest.approx(brute[best], rel=1e-4)
    assert torch.equal(result.keep, without([best]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("percdamp", [0, 0.01])
def test_greedy_weight_is_refit_of_the_final_keep_set(device, percdamp):
    w, x = problem(seed=1)
    h = hessian(x).to(device)
    result = greedy_removal(w.float().to(device), h, COLUMNS.to(device), k=3, percdamp=percdamp)
    assert len(set(result.removed.tolist())) == 3
    keep = without(result.removed.cpu())
    assert torch.equal(result.keep.cpu(), keep)
    assert rel(result.weight.cpu(), refit(w.float(), h.cpu(), keep, percdamp)) < 1e-4
    if percdamp == 0:  # the costs paid add up to the error of the final model
        assert float(result.costs.sum()) == pytest.approx(error(w, x, lstsq_refit(w, x, keep), keep), rel=1e-4)
        assert bool((result.costs[1:] >= 0).all())


def test_greedy_removes_k_per_block():
    w, x = problem(seed=2)
    h = hessian(x)
    result = greedy_removal(w.float(), h, COLUMNS, k=1, percdamp=0, blocks=2)
    first, second = result.removed.tolist()
    assert {first // 3, second // 3} == {0, 1}
    assert first == int(torch.argmin(obs_costs(w.float(), h, COLUMNS, percdamp=0)))


def test_greedy_ties_go_to_the_lower_unit():
    _, x = problem()
    zero = torch.zeros(OUT, N)
    assert greedy_removal(zero, hessian(x), COLUMNS, k=3).removed.tolist() == [0, 1, 2]
    assert greedy_removal(zero, hessian(x), COLUMNS, k=1, blocks=2).removed.tolist() == [0, 3]


@pytest.mark.parametrize("percdamp", [0, 0.01])
def test_dead_inputs_are_harmless(percdamp):
    w, x = problem()
    x[[2, 6, 7]] = 0  # unit 3 (columns 6, 7) never fires; column 2 of unit 1 neither
    moments = InputMoments(N)
    moments.add(x.T.float())
    keep = without([0, 4])
    new = refit(w.float(), moments, keep, percdamp)
    assert bool(torch.isfinite(new).all())
    assert torch.equal(new[:, keep.tolist().index(2)], w[:, 2].float())  # nothing to learn: left alone
    if percdamp == 0:
        live = torch.tensor([j for j in keep.tolist() if j not in (2, 6, 7)])  # lstsq itself fails on zero rows
        assert rel(new.double() @ x[keep], lstsq_refit(w, x, live) @ x[live]) < 1e-4
    costs = obs_costs(w.float(), moments, COLUMNS, percdamp)
    assert bool(torch.isfinite(costs).all()) and float(costs[3]) == 0
    result = greedy_removal(w.float(), moments, COLUMNS, k=1, percdamp=percdamp)
    assert result.removed.tolist() == [3] and bool(torch.isfinite(result.weight).all())
    assert torch.equal(result.weight[:, 2], w[:, 2].float())
    assert rel(result.weight, refit(w.float(), moments, result.keep, percdamp)) < 1e-4
    assert float(fluctuation(w.float(), moments, COLUMNS)[3]) == 0
    assert float(output_energy(w.float(), moments, COLUMNS)[3]) == 0


W_HAND = torch.tensor([[1.0, 2.0, 0.0, 1.0], [0.0, 1.0, 3.0, -1.0]])  # column norms^2: 1, 5, 9, 2
H_HAND = torch.tensor([[2.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 3.0]])


@pytest.mark.parametrize("columns, flap, energy", [
    ([[0, 1], [2, 3]], [1 * 1 + 2 * 5, 0.5 * 9 + 4 * 2], [(2 + 2 * 2 + 4 * 2) + 2, 3 + (9 + 3)]),
    ([[0, 2], [1, 3]], [1 * 1 + 0.5 * 9, 2 * 5 + 4 * 2], [2 + 9, (4 * 2 + 3) + (2 + 3)]),
])
def test_scores_by_hand(columns, flap, energy):
    columns = torch.tensor(columns)
    variance = torch.tensor([1.0, 2.0, 0.5, 4.0])
    assert fluctuation(W_HAND, variance, columns).tolist() == flap
    assert output_energy(W_HAND, H_HAND, columns).tolist() == energy


def test_output_energy_from_moments_matches_the_hessian():
    w, x = problem(mean=1.5)
    moments = InputMoments(N)
    moments.add(x.T.float())
    from_moments = output_energy(w.float(), moments, COLUMNS[[4, 0, 2]])
    assert rel(from_moments, output_energy(w.float(), moments.hessian, COLUMNS[[4, 0, 2]])) < 1e-6
    brute = [float(((w[:, COLUMNS[u]] @ x[COLUMNS[u]]) ** 2).sum()) / TOKENS for u in (4, 0, 2)]
    assert rel(from_moments, torch.tensor(brute)) < 1e-5


def test_indefinite_hessian_is_retried_with_more_dampening(caplog):
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.001]))  # rounding can leave H like this
    w = torch.ones(2, 4)
    new = refit(w, h, torch.arange(4), percdamp=0)
    assert "retrying with 0.01" in caplog.text
    assert torch.equal(new, w)  # nothing removed: nothing to re-fit, whatever the dampening
    costs = obs_costs(w, h, torch.arange(4).view(2, 2), percdamp=0)
    assert bool(torch.isfinite(costs).all())
    with pytest.raises(LlmpruneError, match="not positive definite even with dampening 10"):
        refit(w, torch.diag(torch.tensor([1.0, 1.0, 1.0, -100.0])), torch.arange(4), percdamp=0)


def test_bad_arguments_are_refused():
    w, x = problem()
    h = hessian(x)
    with pytest.raises(LlmpruneError, match="statistics of shape"):
        refit(w.float(), h[:5, :5], torch.arange(3))
    with pytest.raises(LlmpruneError, match="outside"):
        refit(w.float(), h, torch.tensor([0, N]))
    with pytest.raises(LlmpruneError, match="repeated"):
        obs_costs(w.float(), h, torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(LlmpruneError, match="equal blocks"):
        greedy_removal(w.float(), h, COLUMNS, k=1, blocks=4)
    with pytest.raises(LlmpruneError, match="cannot remove"):
        greedy_removal(w.float(), h, COLUMNS, k=3, blocks=2)
    with pytest.raises(LlmpruneError, match="non-finite"):
        refit(w.float(), h.clone().fill_(float("nan")), torch.arange(3))
