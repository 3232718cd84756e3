"""ADMM pruning: reconstruction against SparseGPT, the closed-form step, exact patterns, sharing."""

from __future__ import annotations

import logging

import pytest
import torch

from llmprune import criteria, masks
from llmprune.criteria import admm, sparsegpt
from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern

UNSTRUCTURED = Pattern()
TWO_FOUR = Pattern.parse("2:4")
FOUR_EIGHT = Pattern.parse("4:8")


def layer(rows: int, cols: int, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random W (rows, cols) and correlated inputs X (tokens, cols) with a few outlier features."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    factors = max(cols // 4, 1)  # the features are driven by cols/4 common factors
    x = torch.randn(tokens, factors, generator=g) @ torch.randn(factors, cols, generator=g)
    x += 0.3 * torch.randn(tokens, cols, generator=g)
    x[:, [c for c in (3, 17, 40) if c < cols]] *= 20  # outlier features, as in LLM activations
    return w, x


def calibrate(module, weight: torch.Tensor, x: torch.Tensor):
    stats = module.init_stats(weight)
    module.accumulate(stats, x)
    return stats


def error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||W0 X - W X||_F, in float64."""
    return float(torch.linalg.matrix_norm((w.double() - pruned.double()) @ x.double().t()))


def nm_zeros(w: torch.Tensor, m: int) -> torch.Tensor:
    """Zeros per group of m along the input dimension, (out, in/m)."""
    return (w.reshape(w.shape[0], -1, m) == 0).sum(dim=2)


def test_registered():
    assert criteria.get("admm") is admm and admm.needs_calibration


@pytest.mark.parametrize("sparsity,pattern", [(0.5, UNSTRUCTURED), (0.7, UNSTRUCTURED), (0.5, TWO_FOUR)],
                         ids=["50%", "70%", "2:4"])
def test_reconstructs_better_than_sparsegpt(sparsity, pattern):
    w, x = layer(16, 64, tokens=512)
    ours = error(w, admm.prune(w, sparsity, pattern, calibrate(admm, w, x))[0], x)
    theirs = error(w, sparsegpt.prune(w, sparsity, pattern, calibrate(sparsegpt, w, x))[0], x)
    assert ours < 0.7 * theirs, (ours, theirs)  # measured: 0.2-0.3 of SparseGPT's error on this layer


def test_refit_solves_the_masked_least_squares_exactly():
    # Each row's kept weights must satisfy H[K, K] w_K = (W0 H)_K: compare with a dense solve per row.
    w, x = layer(6, 24, tokens=128)
    stats = calibrate(admm, w, x)
    pruned, keep = admm.prune(w, 0.6, UNSTRUCTURED, stats, options=admm.AdmmOptions(refit_iterations=200))
    h = stats.spectrum.h.double() * torch.outer(stats.spectrum.scale, stats.spectrum.scale).double()  # H + damp I
    rhs = w.double() @ h
    for row in range(w.shape[0]):
        k = keep[row]
        exact = torch.linalg.solve(h[k][:, k], rhs[row, k])
        assert torch.allclose(pruned[row, k].double(), exact, rtol=1e-3, atol=1e-4)


def test_w_step_is_the_closed_form_solve():
    # W = (W0 H + rho (Z - U)) (H + rho I)^-1 from the eigendecomposition equals a direct solve.
    w, x = layer(5, 12, tokens=64)
    g = torch.Generator().manual_seed(1)
    z, u = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    spec = admm.spectrum(calibrate(admm, w, x), 0.01, False, w.device)
    h = x.t() @ x * (2 / 64)
    h += 0.01 * h.diagonal().mean() * torch.eye(12)
    assert torch.allclose(spec.h, h, rtol=1e-5, atol=1e-5)  # unnormalized: the damped H itself
    for rho in (0.01, 1.0, 30.0):
        rhs = w @ h + rho * (z - u)
        direct = torch.linalg.solve(h.double() + rho * torch.eye(12, dtype=torch.float64), rhs.double().t()).t()
        assert torch.allclose(spec.shifted_solve(rhs, rho).double(), direct, rtol=1e-4, atol=1e-4 * direct.abs().max())


def test_uncorrelated_inputs_give_magnitude_pruning_and_untouched_survivors():
    # X = I: H is a multiple of I, nothing to compensate: [1..8] at 2:4 keeps [0,0,3,4,0,0,7,8].
    w = torch.arange(1.0, 9.0).view(1, 8)
    pruned, keep = admm.prune(w, 0.5, TWO_FOUR, calibrate(admm, w, torch.eye(8)))
    assert keep.tolist() == [[False, False, True, True, False, False, True, True]]
    assert torch.allclose(pruned, torch.tensor([[0.0, 0, 3, 4, 0, 0, 7, 8]]), atol=1e-5)
    pruned, _ = admm.prune(w, 0.5, UNSTRUCTURED, calibrate(admm, w, torch.eye(8)))
    assert torch.allclose(pruned, torch.tensor([[0.0, 0, 0, 0, 5, 6, 7, 8]]), atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 13), (16, 40), (5, 200)])
@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.9])
def test_unstructured_count_is_exact(shape, sparsity):
    w, x = layer(*shape, tokens=64)
    pruned, keep = admm.prune(w, sparsity, UNSTRUCTURED, calibrate(admm, w, x))
    assert int((~keep).sum()) == masks.prune_count(w.numel(), sparsity)
    assert torch.equal(pruned != 0, keep)


@pytest.mark.parametrize("pattern", [TWO_FOUR, FOUR_EIGHT])
def test_n_m_groups_are_exact(pattern):
    w, x = layer(12, 64, tokens=128)
    pruned, keep = admm.prune(w, 0.5, pattern, calibrate(admm, w, x))
    assert (nm_zeros(pruned, pattern.m) == pattern.n).all()
    assert torch.equal(pruned != 0, keep)


def test_zero_sparsity_is_a_copy():
    w, x = layer(4, 16)
    pruned, keep = admm.prune(w, 0.0, UNSTRUCTURED, calibrate(admm, w, x))
    assert torch.equal(pruned, w) and keep.all()


def test_deterministic():
    w, x = layer(16, 64, tokens=256)
    for pattern, sparsity in ((UNSTRUCTURED, 0.6), (TWO_FOUR, 0.5)):
        a = admm.prune(w, sparsity, pattern, calibrate(admm, w, x))
        b = admm.prune(w, sparsity, pattern, calibrate(admm, w, x))
        assert torch.equal(a[0].view(torch.int32), b[0].view(torch.int32)) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("pattern,sparsity", [(UNSTRUCTURED, 0.7), (TWO_FOUR, 0.5), (FOUR_EIGHT, 0.5)])
def test_every_iterate_meets_its_pattern(pattern, sparsity):
    w, x = layer(8, 32, tokens=128)
    spec = admm.spectrum(calibrate(admm, w, x), admm.PERCDAMP, True, w.device)
    states = list(admm.iterate(w * spec.scale, spec, sparsity, pattern, iterations=12, ramp=6))
    assert [s.iteration for s in states] == list(range(12))
    assert [s.sparsity for s in states] == sorted(s.sparsity for s in states)  # the ramp never shrinks the mask
    assert states[0].sparsity < sparsity and states[-1].sparsity == states[5].sparsity == sparsity
    assert states[-1].rho > states[0].rho
    for s in states:
        assert int((~s.keep).sum()) == masks.prune_count(w.numel(), s.sparsity)
        assert (s.z[~s.keep] == 0).all()
        if pattern.kind == "nm":
            assert (nm_zeros(s.z.masked_fill(s.keep, 1), pattern.m) <= pattern.n).all()
    if pattern.kind == "nm":
        assert (nm_zeros(states[-1].keep.float(), pattern.m) == pattern.n).all()


def test_shared_statistics_give_the_same_result_as_separate_ones():
    # q, k and v share one Hessian: one eigendecomposition, and each matrix pruned as if alone.
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    x[:, 3] = 0
    ws = [torch.randn(rows, 16) for rows in (8, 4, 4)]
    shared = calibrate(admm, ws[0], x)
    for w in ws:
        alone = admm.prune(w, 0.5, UNSTRUCTURED, calibrate(admm, w, x))
        together = admm.prune(w, 0.5, UNSTRUCTURED, shared)
        assert torch.equal(alone[0], together[0]) and torch.equal(alone[1], together[1])
    assert shared.h is None and shared.spectrum is not None
    with pytest.raises(LlmpruneError, match="percdamp=0.01, normalize=True; asked for percdamp=0.1"):
        admm.prune(ws[0], 0.5, UNSTRUCTURED, shared, options=admm.AdmmOptions(percdamp=0.1))
    with pytest.raises(LlmpruneError, match="already used"):
        admm.accumulate(shared, x)


def test_dead_inputs_stay_finite_and_keep_their_weight():
    w, x = layer(16, 32)
    x[:, 5] = 0
    pruned, keep = admm.prune(w, 0.3, UNSTRUCTURED, calibrate(admm, w, x))
    assert torch.isfinite(pruned).all()
    assert int((~keep).sum()) == masks.prune_count(w.numel(), 0.3)
    # The re-fit cannot move an input no token fired: kept weights keep their value, up to the
    # conjugate-gradient tolerance of the re-fit (REFIT_TOLERANCE 1e-5 of the whole matrix's residual).
    assert torch.allclose(pruned[keep[:, 5], 5], w[keep[:, 5], 5], rtol=1e-3)


def test_kept_zeros_become_tiny_and_are_reported(caplog):
    # 8 dead inputs with zero weights (128 zeros) but only 51 to prune: 77 kept weights would be 0.
    w, x = layer(16, 32)
    w[:, :8] = 0
    x[:, :8] = 0
    with caplog.at_level(logging.WARNING, logger="llmprune.criteria.admm"):
        pruned, keep = admm.prune(w, 0.1, UNSTRUCTURED, calibrate(admm, w, x))
    assert "77 kept weights were exactly 0" in caplog.text
    assert int((~keep).sum()) == 51 and torch.equal(pruned != 0, keep)
    assert (pruned[:, :8][keep[:, :8]].abs() == torch.finfo(torch.float32).tiny).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_returns_the_input_dtype(dtype):
    w, x = layer(16, 32)
    pruned, keep = admm.prune(w.to(dtype), 0.5, UNSTRUCTURED, calibrate(admm, w, x))
    assert pruned.dtype == dtype and keep.dtype == torch.bool
    assert torch.equal(pruned != 0, keep) and int((~keep).sum()) == 256


def test_bad_requests_are_clear_errors():
    w, x = layer(4, 12)
    stats = calibrate(admm, w, x)
    with pytest.raises(LlmpruneError, match="multiple of M=8"):
        admm.prune(w, 0.5, FOUR_EIGHT, stats)
    with pytest.raises(LlmpruneError, match="calibration"):
        admm.prune(w, 0.5, UNSTRUCTURED, None)
    with pytest.raises(LlmpruneError, match="not supported"):
        admm.prune(w, 0.5, Pattern("channels"), stats)
    with pytest.raises(LlmpruneError, match="ramp <= iterations"):
        admm.AdmmOptions(iterations=5, ramp=6)
    with pytest.raises(LlmpruneError, match="statistics for 12 inputs"):
        admm.prune(torch.zeros(4, 8), 0.5, UNSTRUCTURED, stats)


def test_admm_through_the_cli(tiny_with_tokenizer, calib_text, tmp_path):
    """--method admm prunes every decoder linear to the exact count, unstructured and 2:4."""
    import json

    from safetensors.torch import load_file

    from conftest import run_cli

    for pattern in ("unstructured", "2:4"):
        out = tmp_path / pattern.replace(":", "of")
        assert run_cli(tiny_with_tokenizer, "--method", "admm", "--sparsity", "0.5", "--pattern", pattern,
                       "--calib-data", calib_text, "--nsamples", "4", "--seqlen", "64", "-o", out, "-q") == 0
        weights = load_file(out / "model.safetensors")
        report = json.loads((out / "llmprune.json").read_text())["sparsity"]["matrices"]
        for name, row in report.items():
            assert row["achieved"] == 0.5, name
            if pattern == "2:4":
                assert masks.is_n_m(weights[name], 2, 4), name


def test_configured_criterion_prunes_with_its_options():
    w, x = layer(16, 64)
    options = admm.AdmmOptions(iterations=6, ramp=2, rho_start=0.1, rho_growth=1.3, refit=False)
    stats = calibrate(admm, w, x)
    configured = admm.Configured(options)
    assert configured.needs_calibration and configured.init_stats is admm.init_stats
    got, keep = configured.prune(w, 0.5, UNSTRUCTURED, stats)
    want, want_keep = admm.prune(w, 0.5, UNSTRUCTURED, stats, "l1", options)
    assert torch.equal(got, want) and torch.equal(keep, want_keep)
    default, _ = admm.prune(w, 0.5, UNSTRUCTURED, stats)
    assert not torch.equal(got, default)


def test_admm_options_through_the_cli(tiny_with_tokenizer, calib_text, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from conftest import expect_error, run_cli

    calib = ["--calib-data", str(calib_text), "--nsamples", "4", "--seqlen", "64", "-q"]
    outs = {}
    for name, extra in (("default", []), ("custom", ["--admm-iterations", "6", "--admm-rho", "0.1",
                                                     "--admm-rho-growth", "1.3", "--no-admm-refit"])):
        outs[name] = tmp_path / name
        assert run_cli(tiny_with_tokenizer, "--method", "admm", "--sparsity", "0.5", *calib, *extra,
                       "-o", outs[name]) == 0
    recipe = json.loads((outs["custom"] / "llmprune.json").read_text())
    assert {k: recipe["config"][k] for k in ("admm_iterations", "admm_rho", "admm_rho_growth", "admm_refit")} == \
        {"admm_iterations": 6, "admm_rho": 0.1, "admm_rho_growth": 1.3, "admm_refit": False}
    assert all(row["achieved"] == 0.5 for row in recipe["sparsity"]["matrices"].values())
    a, b = load_file(outs["default"] / "model.safetensors"), load_file(outs["custom"] / "model.safetensors")
    assert any(not torch.equal(a[n], b[n]) for n in recipe["sparsity"]["matrices"])
    expect_error(capsys, tmp_path, [tiny_with_tokenizer, "--method", "wanda", "--sparsity", "0.5",
                                    "--admm-iterations", "6"], "--admm-* options apply to --method admm, not wanda")
    expect_error(capsys, tmp_path, [tiny_with_tokenizer, "--method", "admm", "--sparsity", "0.5",
                                    "--admm-rho-growth", "0.5"], "rho_growth >= 1")
