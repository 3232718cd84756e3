import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune import masks
from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern


def test_two_four_on_one_to_eight():
    row = torch.arange(1.0, 9.0).view(1, 8)
    keep = masks.n_m(row, 2, 4)
    assert (row * keep).tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_four_eight_zeroes_the_four_smallest_of_each_group():
    row = torch.tensor([[8.0, 1, 7, 2, 6, 3, 5, 4]])
    assert (row * masks.n_m(row, 4, 8)).tolist() == [[8, 0, 7, 0, 6, 0, 5, 0]]


def test_unstructured_exact_count_and_smallest_first():
    w = torch.tensor([[0.5, -0.1, 0.3], [-0.9, 0.2, 0.05]])
    keep = masks.unstructured(w.abs(), 0.5)
    assert keep.tolist() == [[True, False, True], [True, False, False]]


def test_ties_broken_by_lower_index_first():
    scores = torch.tensor([1.0, 2, 1, 2, 1, 2])
    # 4 of 6 pruned: the three 1s, then the first 2 (index 1)
    assert masks.lowest_k(scores, 4).tolist() == [True, True, True, False, True, False]
    row = torch.ones(1, 8)
    assert masks.n_m(row, 2, 4).tolist() == [[False, False, True, True, False, False, True, True]]


def test_per_row_prunes_the_same_number_in_every_row():
    scores = torch.tensor([[1.0, 2, 3, 4], [40.0, 30, 20, 10]])
    keep = masks.unstructured(scores, 0.5, per_row=True)
    assert keep.tolist() == [[False, False, True, True], [True, True, False, False]]


@pytest.mark.parametrize("text,message", [
    ("2-4", "malformed"), ("a:4", "malformed"), ("4:2", "0 < N < M"), ("2:2", "0 < N < M"), ("0:4", "0 < N < M"),
])
def test_pattern_parse_rejects(text, message):
    with pytest.raises(LlmpruneError, match=message):
        Pattern.parse(text)


def test_pattern_sparsity():
    assert Pattern.parse("2:4").sparsity == 0.5
    assert Pattern.parse("1:4").sparsity == 0.25
    assert Pattern.parse("unstructured").sparsity is None


def test_n_m_needs_divisible_input_dim():
    with pytest.raises(LlmpruneError, match="multiple of M=4"):
        masks.n_m(torch.ones(2, 6), 2, 4)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.integers(0, 6), min_size=1, max_size=200),
    frac=st.floats(0, 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
)
def test_lowest_k_matches_a_stable_sort(values, frac, dtype):
    scores = (torch.tensor(values, dtype=torch.float64) / 4).to(dtype)  # many exact ties
    k = int(frac * len(values))
    want = torch.zeros(len(values), dtype=torch.bool)
    want[torch.sort(scores.double(), stable=True).indices[:k]] = True
    assert torch.equal(masks.lowest_k(scores, k), want)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), nm=st.sampled_from([(1, 4), (2, 4), (4, 8), (3, 8)]),
       seed=st.integers(0, 1000))
def test_n_m_property(rows, groups, nm, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (rows, groups * m), generator=g).float()
    keep = masks.n_m(w.abs(), n, m)
    assert (keep.view(rows, groups, m).sum(-1) == m - n).all()
    assert masks.is_n_m(w * keep, n, m)
    # every pruned weight is no larger than every kept one of its group
    a = w.abs().view(rows, groups, m)
    k = keep.view(rows, groups, m)
    pruned_max = torch.where(~k, a, torch.full_like(a, -1)).amax(-1)
    kept_min = torch.where(k, a, torch.full_like(a, 99)).amin(-1)
    assert (pruned_max <= kept_min).all()


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 20), st.integers(1, 20)), sparsity=st.floats(0, 0.99), seed=st.integers(0, 99))
def test_unstructured_exact_round_count(shape, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-4, 5, shape, generator=g).to(torch.bfloat16)
    keep = masks.unstructured(w.abs(), sparsity)
    assert int((~keep).sum()) == round(sparsity * w.numel())
