import json
import weakref

import pytest
import torch
import torch.nn.functional as F

from llmprune.distill import (TopK, check_vocab, combined, hidden_mse, kl_loss, kl_topk_loss, lm_loss,
                              topk_teacher)
from llmprune.errors import LlmpruneError

B, T, V = 2, 5, 11


def logits(seed: int, scale: float = 2.0, shape=(B, T, V)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def reference_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """torch's own KL on (N, V) rows: batchmean is the sum over rows / N."""
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                    reduction="batchmean", log_target=True) * temperature**2


# (1) zero exactly when the student is the teacher, positive otherwise


def test_every_loss_is_zero_on_the_teacher_and_positive_elsewhere():
    t, s = logits(0), logits(1)
    for temperature in (1.0, 2.0):
        assert abs(kl_loss(t, t, temperature).item()) < 1e-6
        assert kl_loss(s, t, temperature).item() > 1e-2
        for k in (3, V):
            top = topk_teacher(t, k, temperature, dtype=torch.float32)
            assert abs(kl_topk_loss(t, top).item()) < 1e-6
            assert kl_topk_loss(s, top).item() > 1e-2
    hidden = torch.randn(B, T, 8)
    assert hidden_mse(hidden, hidden).item() == 0
    assert hidden_mse(hidden + 0.1, hidden).item() > 1e-4


def test_float16_topk_is_zero_on_the_teacher_within_its_rounding():
    t = logits(0)
    assert abs(kl_topk_loss(t, topk_teacher(t, 4, 1.0)).item()) < 1e-5


def test_lm_loss_matches_cross_entropy_and_vanishes_on_certain_predictions():
    x, ids = logits(2), torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    ref = F.cross_entropy(x[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert lm_loss(x, ids).item() == pytest.approx(ref.item(), abs=1e-6)
    certain = 100.0 * F.one_hot(ids.roll(-1, dims=-1), V).float()  # all mass on the next token
    assert abs(lm_loss(certain, ids).item()) < 1e-6


# (2) against torch's KL


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_loss_is_torch_kl_div_times_t_squared(temperature):
    s, t = logits(1), logits(0)
    want = reference_kl(s, t, temperature)
    assert kl_loss(s, t, temperature).item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)


def test_kl_loss_on_a_hand_checked_pair():
    # teacher (1/2, 1/2), student (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    t = torch.log(torch.tensor([[0.5, 0.5]]))
    s = torch.log(torch.tensor([[0.25, 0.75]]))
    want = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    assert kl_loss(s, t).item() == pytest.approx(want.item(), rel=1e-6)


def test_bf16_student_is_upcast_not_computed_in_bf16():
    s, t = logits(1).bfloat16(), logits(0)
    want = reference_kl(s.float(), t, 2.0)
    assert kl_loss(s, t, 2.0).item() == pytest.approx(want.item(), rel=1e-6)


# (3) top-k against full KL


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_the_whole_vocabulary_is_kl_loss(temperature):
    s, t = logits(1), logits(0)
    top = topk_teacher(t, V, temperature, dtype=torch.float32)
    assert torch.isneginf(top.rest).all()
    assert kl_topk_loss(s, top).item() == pytest.approx(kl_loss(s, t, temperature).item(), abs=1e-5)


def test_float16_topk_with_the_whole_vocabulary_is_kl_loss_within_rounding():
    s, t = logits(1), logits(0)
    full = kl_loss(s, t).item()
    assert kl_topk_loss(s, topk_teacher(t, V, 1.0)).item() == pytest.approx(full, rel=2e-3)


@pytest.mark.parametrize("seed", range(20))
def test_topk_below_the_vocabulary_is_a_lower_bound(seed):
    s, t = logits(2 * seed, 3.0), logits(2 * seed + 1, 3.0)
    for k in (1, 4, V - 1):
        for temperature in (1.0, 2.0):
            bound = kl_topk_loss(s, topk_teacher(t, k, temperature, dtype=torch.float32)).item()
            full = kl_loss(s, t, temperature).item()
            assert 0 < bound <= full * (1 + 1e-6) + 1e-6  # equal up to float32 rounding when k = V - 1


def test_topk_is_exact_when_the_student_tail_has_the_teachers_shape():
    t = logits(0)
    top = topk_teacher(t, 3, 1.0, dtype=torch.float32)
    # Change only the kept tokens' logits: outside them the student stays proportional to the teacher.
    s = t.scatter(-1, top.indices.long(), torch.randn(B, T, 3) * 3)
    full = kl_loss(s, t).item()
    assert full > 1e-2
    assert kl_topk_loss(s, top).item() == pytest.approx(full, rel=1e-5)
    # ...and strictly below once the tail's shape differs.
    s2 = s.clone()
    s2[..., :] += torch.randn(B, T, V)
    s2.scatter_(-1, top.indices.long(), s.gather(-1, top.indices.long()))
    assert kl_topk_loss(s2, top).item() < kl_loss(s2, t).item() - 1e-3


def test_topk_gradient_on_the_kept_tokens_is_the_full_kl_gradient():
    t = logits(0)
    top = topk_teacher(t, 4, 2.0, dtype=torch.float32)
    s1 = logits(1).requires_grad_(True)
    s2 = s1.detach().clone().requires_grad_(True)
    kl_loss(s1, t, 2.0).backward()
    kl_topk_loss(s2, top).backward()
    idx = top.indices.long()
    torch.testing.assert_close(s2.grad.gather(-1, idx), s1.grad.gather(-1, idx), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(s2.grad, s1.grad, atol=1e-4)  # the tail's gradient does differ


def test_topk_teacher_representation():
    t = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    top = topk_teacher(t, 2, 1.0, dtype=torch.float32)
    assert top.indices.dtype == torch.int32 and top.indices.tolist() == [[1, 3]]
    torch.testing.assert_close(top.logprobs.exp(), torch.tensor([[0.5, 0.25]]))
    torch.testing.assert_close(top.rest.exp(), torch.tensor([0.25]))
    assert topk_teacher(t, 2, 1.0).logprobs.dtype == torch.float16


def test_topk_refuses_another_temperature_and_bad_k():
    t = logits(0)
    top = topk_teacher(t, 3, 2.0)
    with pytest.raises(LlmpruneError, match="temperature 2.0"):
        kl_topk_loss(t, top, temperature=1.0)
    with pytest.raises(LlmpruneError, match="k = 12"):
        topk_teacher(t, V + 1)
    with pytest.raises(LlmpruneError, match="does not fit"):
        kl_topk_loss(t[:, :-1], top)


def test_topk_accepts_int64_indices():
    s, t = logits(1), logits(0)
    top = topk_teacher(t, 5, 1.0, dtype=torch.float32)
    wide = TopK(top.indices.long(), top.logprobs, top.rest, top.temperature)
    assert kl_topk_loss(s, wide).item() == kl_topk_loss(s, top).item()


# (4) chunking


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunk_size_changes_nothing(chunk):
    s, t = logits(1), logits(0)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    top = topk_teacher(t, 4, 2.0)
    cases = [
        (lambda x, c: kl_loss(x, t, 2.0, chunk=c)),
        (lambda x, c: kl_topk_loss(x, top, chunk=c)),
        (lambda x, c: lm_loss(x, ids, chunk=c)),
    ]
    for loss in cases:
        one, many = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        whole, split = loss(one, B * T), loss(many, chunk)
        assert split.item() == pytest.approx(whole.item(), rel=1e-6)
        whole.backward(), split.backward()
        torch.testing.assert_close(many.grad, one.grad, rtol=1e-6, atol=1e-8)


def test_no_whole_float32_copy_is_kept_for_the_backward_pass():
    # Every tensor autograd saves for a backward pass, watched: autograd through a plain chunked
    # loop would keep every chunk's float32 softmax, a whole (B, T, V) float32 copy in pieces.
    shape = (2, 64, 1024)
    s, t = logits(1, shape=shape).bfloat16().requires_grad_(True), logits(0, shape=shape)
    saved, largest = [], []

    def pack(x):
        saved.append(weakref.ref(x))
        largest.append(x.numel() if x.dtype == torch.float32 else 0)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = kl_loss(s, t, chunk=16)
    alive = [x for x in (ref() for ref in saved) if x is not None]
    assert max(largest) == 16 * 1024  # one chunk at a time while it is computed
    assert sum(x.numel() for x in alive if x.dtype == torch.float32) < 16 * 1024  # not even one chunk
    assert [(x.dtype, x.shape) for x in alive] == [(torch.bfloat16, (128, 1024))]  # the gradient, student dtype
    loss.backward()
    assert s.grad.dtype == torch.bfloat16


# (5) masks


def test_mask_excludes_positions():
    s, t = logits(1), logits(0)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = False
    top = topk_teacher(t, 4, 1.0)
    h_s, h_t = logits(3, shape=(B, T, 8)), logits(4, shape=(B, T, 8))
    changed = s.clone(), t.clone(), h_s.clone(), h_t.clone()
    for x in changed:
        x[~mask] = torch.nan  # garbage in a masked position must not reach the loss
    s2, t2, h_s2, h_t2 = changed
    top2 = topk_teacher(t.masked_fill(~mask[..., None], 0.0), 4, 1.0)
    assert kl_loss(s2, t2, 2.0, mask=mask).item() == pytest.approx(kl_loss(s, t, 2.0, mask=mask).item(), rel=1e-6)
    assert kl_topk_loss(s2, top2, mask=mask).item() == pytest.approx(kl_topk_loss(s, top, mask=mask).item(), rel=1e-6)
    assert hidden_mse(h_s2, h_t2, mask).item() == pytest.approx(hidden_mse(h_s, h_t, mask).item(), rel=1e-6)
    # The value is the mean over the kept positions only.
    assert kl_loss(s, t, 2.0, mask=mask).item() == pytest.approx(reference_kl(s[mask], t[mask], 2.0).item(), rel=1e-6)
    assert kl_loss(s, t, 2.0, mask=mask).item() != pytest.approx(kl_loss(s, t, 2.0).item(), rel=1e-3)


def test_masked_positions_get_no_gradient():
    s, t = logits(1).requires_grad_(True), logits(0)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2] = False
    kl_loss(s, t, mask=mask).backward()
    assert s.grad[1, 2].abs().max().item() == 0
    assert s.grad[mask].abs().min().item() > 0


def test_all_masked_is_zero():
    s, t = logits(1).requires_grad_(True), logits(0)
    loss = kl_loss(s, t, mask=torch.zeros(B, T, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and s.grad.abs().max().item() == 0


def test_lm_loss_mask_drops_predictions_from_or_of_padding():
    x = logits(2)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    ids[0, :2] = -100  # left padding: never a target, never an input
    mask = ids >= 0
    s, y = x[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)
    counted = (mask[:, :-1] & mask[:, 1:]).reshape(-1)
    ref = F.cross_entropy(s[counted], y[counted])
    assert lm_loss(x, ids, mask).item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(LlmpruneError, match=r"\[0, 11\)"):
        lm_loss(x, ids)


# (6) gradients


def test_gradients_reach_the_student_and_not_the_teacher():
    s, t = logits(1).requires_grad_(True), logits(0).requires_grad_(True)
    h_s, h_t = logits(3, shape=(B, T, 8)).requires_grad_(True), logits(4, shape=(B, T, 8)).requires_grad_(True)
    combined({"kl": kl_loss(s, t, 2.0), "mse": hidden_mse(h_s, h_t)}, {"kl": 1.0, "mse": 1.0}).backward()
    assert t.grad is None and h_t.grad is None
    assert s.grad is not None and s.grad.abs().max().item() > 0 and h_s.grad.abs().max().item() > 0
    ref_s = s.detach().clone().requires_grad_(True)
    reference_kl(ref_s, t.detach(), 2.0).backward()
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-5, atol=1e-8)


def test_gradient_scales_with_the_loss_weight():
    s, t = logits(1).requires_grad_(True), logits(0)
    kl_loss(s, t).backward()
    once = s.grad.clone()
    s.grad = None
    (0.25 * kl_loss(s, t)).backward()
    torch.testing.assert_close(s.grad, 0.25 * once)


def test_no_gradient_needed_no_gradient_computed(monkeypatch):
    s, t = logits(1), logits(0)

    def refuse(*args, **kwargs):
        raise AssertionError("a gradient was computed under no_grad")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    with torch.no_grad():
        loss = kl_loss(s.requires_grad_(True), t)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(reference_kl(s.detach(), t, 1.0).item(), rel=1e-6)


# (7) hidden states


def test_hidden_mse_by_hand():
    t = torch.tensor([[[1.0, 2.0], [3.0, 2.0]]])  # (B=1, T=2, D=2), ||t||^2 = 18
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # ||s - t||^2 = 4
    assert hidden_mse(s, t).item() == pytest.approx(4 / 18)
    assert hidden_mse([s, torch.zeros_like(t)], [t, t]).item() == pytest.approx((4 / 18 + 1) / 2)  # layers averaged


def test_hidden_mse_pools_the_batch_not_per_sample():
    t = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])  # samples with ||t||^2 25 and 1
    s = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]])  # per-sample ratios 0 and 1 (their mean would be 1/2)
    assert hidden_mse(s, t).item() == pytest.approx(1 / 26)


def test_hidden_mse_refuses_mismatched_layers():
    h = torch.ones(1, 2, 3)
    with pytest.raises(LlmpruneError, match="got 2 and 1"):
        hidden_mse([h, h], [h])


# combined


def test_combined_weights_and_names():
    losses = {"lm": torch.tensor(2.0), "kl": torch.tensor(3.0)}
    assert combined(losses, {"lm": 0.5, "kl": 2.0}).item() == 7.0
    with pytest.raises(LlmpruneError, match="'mse'"):
        combined(losses, {"lm": 0.5, "kl": 2.0, "mse": 1.0})


# (8) vocabulary


def test_check_vocab_sizes_one_line_naming_both():
    check_vocab(49152, 49152)
    with pytest.raises(LlmpruneError) as err:
        check_vocab(49152, 49153)
    message = str(err.value)
    assert "\n" not in message and "49152" in message and "49153" in message


def test_check_vocab_tokenizers(tmp_path):
    vocab = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, "added_tokens": []}
    for name, content in [("student", vocab), ("teacher", vocab),
                          ("other", {**vocab, "model": {"type": "BPE", "vocab": {"a": 1, "b": 0}}})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(content))
    # Same tokenizer re-saved with other formatting and runtime settings: accepted.
    (tmp_path / "teacher" / "tokenizer.json").write_text(json.dumps({**vocab, "padding": {"length": 8}}, indent=2))
    check_vocab(2, 2, tmp_path / "student", tmp_path / "teacher" / "tokenizer.json")
    check_vocab(2, 2, tmp_path / "student", None)  # compared only when both are given
    with pytest.raises(LlmpruneError) as err:
        check_vocab(2, 2, tmp_path / "student", tmp_path / "other")
    message = str(err.value)
    assert "\n" not in message and "other" in message and "student" in message and "2 tokens" in message
    with pytest.raises(LlmpruneError, match="no tokenizer.json or tokenizer.model"):
        check_vocab(2, 2, tmp_path / "student", tmp_path)
