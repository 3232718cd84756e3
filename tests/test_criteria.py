"""Pruning criteria as pure tensor functions: hand-checked masks, exact sparsity, reconstruction."""

from __future__ import annotations

import logging

import pytest
import torch

from llmprune import criteria, masks
from llmprune.criteria import magnitude, sparsegpt, wanda
from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern

UNSTRUCTURED = Pattern()
TWO_FOUR = Pattern.parse("2:4")
FOUR_EIGHT = Pattern.parse("4:8")


def calibrate(module, weight: torch.Tensor, *batches: torch.Tensor):
    stats = module.init_stats(weight)
    for x in batches:
        module.accumulate(stats, x)
    return stats


def layer(rows: int, cols: int, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random W (rows, cols) and correlated inputs X (tokens, cols) with a few outlier features."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    factors = max(cols // 4, 1)  # correlation: the features are driven by cols/4 factors
    x = torch.randn(tokens, factors, generator=g) @ torch.randn(factors, cols, generator=g)
    x += 0.3 * torch.randn(tokens, cols, generator=g)
    x[:, [c for c in (3, 17, 40) if c < cols]] *= 20  # outlier features, as in LLM activations
    return w, x


def test_registry_names_the_four_criteria():
    assert criteria.names() == ["admm", "magnitude", "sparsegpt", "wanda"]
    assert criteria.get("wanda") is wanda and criteria.get("sparsegpt") is sparsegpt


# ---- Wanda ----

# Feature norms [10, 4, 2, 1]: column 0 is sqrt(6^2 + 8^2) = 10. Scores |W| * norm are
# row 0: [10, 8, 6, 4], row 1: [40, 12, 4, 1] -- the activations reverse row 0's magnitude order.
HAND_W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-4.0, 3.0, -2.0, 1.0]])
HAND_X = (torch.tensor([[6.0, 0.0, 0.0, 0.0]]), torch.tensor([[8.0, 4.0, 2.0, 1.0]]))


@pytest.mark.parametrize("pattern", [UNSTRUCTURED, TWO_FOUR])
def test_wanda_follows_activations_where_magnitude_does_not(pattern):
    stats = calibrate(wanda, HAND_W, *HAND_X)
    assert torch.equal(stats.sum_sq, torch.tensor([100.0, 16.0, 4.0, 1.0])) and stats.tokens == 2

    pruned, keep = wanda.prune(HAND_W, 0.5, pattern, stats)
    assert keep.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert pruned.tolist() == [[1.0, 2.0, 0.0, 0.0], [-4.0, 3.0, 0.0, 0.0]]
    _, magnitude_keep = magnitude.prune(HAND_W, 0.5, pattern)
    assert magnitude_keep.tolist() == [[False, False, True, True], [True, True, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wanda_survivors_are_bit_identical(dtype):
    w, x = layer(32, 64)
    w = w.to(dtype)
    pruned, keep = wanda.prune(w, 0.5, UNSTRUCTURED, calibrate(wanda, w, x.to(dtype)))
    assert pruned.dtype == dtype
    assert torch.equal(pruned.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[keep],
                       w.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[keep])
    assert (pruned[~keep] == 0).all()
    assert (keep.sum(dim=1) == 32).all()  # per row


def test_wanda_without_calibration_is_a_clear_error():
    with pytest.raises(LlmpruneError, match="calibration"):
        wanda.prune(HAND_W, 0.5, UNSTRUCTURED, None)
    with pytest.raises(LlmpruneError, match="calibration"):
        wanda.prune(HAND_W, 0.5, UNSTRUCTURED, wanda.init_stats(HAND_W))


# ---- SparseGPT ----

def test_sparsegpt_moves_a_pruned_weight_onto_its_duplicate_input():
    # Two identical features: H = a [[1, 1], [1, 1]] + 0.01 a I. Column 0 scores lower (its d is
    # larger), and the OBS update adds w0 * H01 / H11 = 1 / 1.01 to w1.
    w = torch.tensor([[1.0, 2.0]])
    stats = calibrate(sparsegpt, w, torch.tensor([[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0]]))
    pruned, keep = sparsegpt.prune(w, 0.5, UNSTRUCTURED, stats)
    assert keep.tolist() == [[False, True]]
    assert pruned[0, 0] == 0
    assert pruned[0, 1].item() == pytest.approx(2 + 1 / 1.01, rel=1e-5)


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning():
    # X = I: H is a multiple of I, so nothing is compensated and [1..8] at 2:4 keeps [0,0,3,4,0,0,7,8].
    w = torch.arange(1.0, 9.0).view(1, 8)
    stats = calibrate(sparsegpt, w, torch.eye(8))
    assert sparsegpt.prune(w, 0.5, TWO_FOUR, stats)[0].tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]
    assert sparsegpt.prune(w, 0.5, UNSTRUCTURED, stats)[0].tolist() == [[0, 0, 0, 0, 5, 6, 7, 8]]


def reconstruction_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm((w.double() - pruned.double()) @ x.double().t()))


@pytest.mark.parametrize("pattern", [UNSTRUCTURED, TWO_FOUR])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    w, x = layer(64, 128, tokens=512)
    errors = {
        "magnitude": reconstruction_error(w, magnitude.prune(w, 0.5, pattern)[0], x),
        "wanda": reconstruction_error(w, wanda.prune(w, 0.5, pattern, calibrate(wanda, w, x))[0], x),
        "sparsegpt": reconstruction_error(w, sparsegpt.prune(w, 0.5, pattern, calibrate(sparsegpt, w, x))[0], x),
    }
    assert errors["sparsegpt"] < 0.8 * errors["wanda"] < 0.8 * errors["magnitude"], errors


def test_sparsegpt_returns_the_input_dtype():
    w, x = layer(16, 32)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        pruned, keep = sparsegpt.prune(w.to(dtype), 0.5, UNSTRUCTURED, calibrate(sparsegpt, w, x))
        assert pruned.dtype == dtype and keep.dtype == torch.bool
        assert (pruned[~keep] == 0).all()


def test_sparsegpt_zeroes_dead_inputs():
    w, x = layer(16, 32)
    x[:, 5] = 0
    pruned, keep = sparsegpt.prune(w, 0.5, UNSTRUCTURED, calibrate(sparsegpt, w, x))
    assert torch.isfinite(pruned).all()
    assert (pruned[:, 5] == 0).all() and not keep[:, 5].any()  # score 0: pruned first
    assert int((~keep).sum()) == 16 * 16


def test_sparsegpt_raises_dampening_when_the_hessian_is_indefinite(caplog):
    # Eigenvalues 1 +- 1.05: fails at damp 0.01, succeeds at 0.1.
    stats = sparsegpt.Hessian(torch.tensor([[1.0, 1.05], [1.05, 1.0]]), tokens=1)
    with caplog.at_level(logging.WARNING, logger="llmprune.criteria.sparsegpt"):
        pruned, keep = sparsegpt.prune(torch.tensor([[1.0, 2.0]]), 0.5, UNSTRUCTURED, stats)
    assert "retrying with 0.1" in caplog.text
    assert torch.isfinite(pruned).all() and int(keep.sum()) == 1

    stats = sparsegpt.Hessian(torch.tensor([[float("nan"), 1.05], [1.05, 1.0]]), tokens=1)
    with pytest.raises(LlmpruneError, match="non-finite"):
        sparsegpt.prune(torch.tensor([[1.0, 2.0]]), 0.5, UNSTRUCTURED, stats)


def test_sparsegpt_statistics_serve_several_matrices_with_one_factorisation():
    # q, k and v share one Hessian: each prunes exactly as with statistics of its own.
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    x[:, 3] = 0  # a dead input
    ws = [torch.randn(rows, 16) for rows in (8, 4, 4)]
    shared = calibrate(sparsegpt, ws[0], x)
    for w in ws:
        alone = sparsegpt.prune(w, 0.5, UNSTRUCTURED, calibrate(sparsegpt, w, x))
        together = sparsegpt.prune(w, 0.5, UNSTRUCTURED, shared)
        assert torch.equal(alone[0], together[0]) and torch.equal(alone[1], together[1])
    assert shared.h is None and shared.factor is not None  # H dropped once factored
    with pytest.raises(LlmpruneError, match="dampening 0.01, asked for 0.1"):
        sparsegpt.prune(ws[0], 0.5, UNSTRUCTURED, shared, percdamp=0.1)
    with pytest.raises(LlmpruneError, match="already used"):
        sparsegpt.accumulate(shared, x)


def test_sparsegpt_bad_requests_are_clear_errors():
    w, x = layer(4, 12)
    stats = calibrate(sparsegpt, w, x)
    with pytest.raises(LlmpruneError, match="multiple of M=8"):
        sparsegpt.prune(w, 0.5, FOUR_EIGHT, stats)
    with pytest.raises(LlmpruneError, match="blocksize 6"):
        sparsegpt.prune(w, 0.5, TWO_FOUR, stats, blocksize=6)
    with pytest.raises(LlmpruneError, match="calibration"):
        sparsegpt.prune(w, 0.5, UNSTRUCTURED, None)


# ---- Shared properties ----

METHODS = [magnitude, wanda, sparsegpt]


def run(module, w, x, sparsity, pattern, **kwargs):
    stats = calibrate(module, w, x) if module.needs_calibration else None
    return module.prune(w, sparsity, pattern, stats, **kwargs)


@pytest.mark.parametrize("module", METHODS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
@pytest.mark.parametrize("shape", [(7, 13), (16, 40), (5, 200)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9])
def test_unstructured_sparsity_is_exact(module, shape, sparsity):
    w, x = layer(*shape, tokens=64)
    # A small blocksize makes SparseGPT spread the count over uneven blocks (40 = 16 + 16 + 8).
    kwargs = {"blocksize": 16} if module is sparsegpt else {}
    pruned, keep = run(module, w, x, sparsity, UNSTRUCTURED, **kwargs)
    if module is wanda:  # per row
        expected = shape[0] * masks.prune_count(shape[1], sparsity)
    else:
        expected = masks.prune_count(w.numel(), sparsity)
    assert int((~keep).sum()) == expected
    assert int((pruned == 0).sum()) == expected
    if sparsity == 0:
        assert torch.equal(pruned, w)


@pytest.mark.parametrize("module", METHODS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
@pytest.mark.parametrize("pattern", [TWO_FOUR, FOUR_EIGHT])
def test_n_m_patterns_are_valid(module, pattern):
    w, x = layer(24, 64)
    pruned, keep = run(module, w, x, 0.5, pattern, **({"blocksize": 16} if module is sparsegpt else {}))
    assert masks.is_n_m(pruned, pattern.n, pattern.m)
    assert int((~keep).sum()) == w.numel() // 2
    assert int((pruned == 0).sum()) == w.numel() // 2


@pytest.mark.parametrize("module", [wanda, sparsegpt], ids=["wanda", "sparsegpt"])
def test_accumulating_batches_equals_one_batch(module):
    w, x = layer(8, 32, tokens=300)
    whole = calibrate(module, w, x)
    parts = calibrate(module, w, x[:7], x[7:7], x[7:150].view(11, 13, 32), x[150:])  # empty, 3-D
    assert parts.tokens == whole.tokens == 300
    a, b = (parts.sum_sq, whole.sum_sq) if module is wanda else (parts.h, whole.h)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("module", [wanda, sparsegpt], ids=["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [UNSTRUCTURED, TWO_FOUR])
def test_deterministic(module, pattern):
    w, x = layer(32, 64)
    first = run(module, w, x, 0.5, pattern)
    second = run(module, w.clone(), x.clone(), 0.5, pattern)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("module", [wanda, sparsegpt], ids=["wanda", "sparsegpt"])
def test_activations_of_the_wrong_width_are_rejected(module):
    stats = module.init_stats(torch.zeros(4, 8))
    with pytest.raises(LlmpruneError, match="features"):
        module.accumulate(stats, torch.zeros(3, 9))


def test_sparsegpt_blocked_triangular_inverse(monkeypatch):
    torch.manual_seed(0)
    n = 300
    x = torch.randn(900, n)
    lower = torch.linalg.cholesky(2 * x.T @ x / 900 + 0.01 * torch.eye(n)).mT.contiguous().mT  # column-major
    direct = torch.linalg.solve_triangular(lower, torch.eye(n), upper=False)
    assert torch.equal(sparsegpt.lower_inverse(lower), direct)  # up to the leaf size: the solve against I itself
    monkeypatch.setattr(sparsegpt, "INVERSE_LEAF", 40)  # blocked: four levels, uneven halves
    blocked = sparsegpt.lower_inverse(lower)
    assert torch.equal(blocked, blocked.tril())
    torch.testing.assert_close(blocked, direct, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lower @ blocked, torch.eye(n), rtol=0, atol=1e-4)
