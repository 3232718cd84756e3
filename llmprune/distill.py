"""Loss mathematics for healing a pruned model by distillation from the dense model it came from.

Pure tensor functions; nothing here knows models, data or devices beyond the tensors it is given.

* ``kl_loss``: KL(teacher || student) on softmax(logits / T), times T^2 (Hinton et al. 2015), the
  mean over the positions a mask keeps.
* ``topk_teacher`` / ``kl_topk_loss``: the same from a teacher kept as its k most likely tokens per
  position plus one bucket for the rest, small enough to precompute on disk.
* ``hidden_mse``: SquareHead's normalised MSE between hidden states (Kurtic et al. 2023).
* ``lm_loss``: next-token cross entropy, for an ``lm + distill`` objective; ``combined`` weights them.
* ``check_vocab``: refuse a teacher whose vocabulary or tokenizer is not the student's.

Logit losses upcast to float32 one chunk of positions at a time, and compute the gradient for the
student's logits chunk by chunk during the forward pass (as Liger's fused losses do): autograd
through a plain chunked loop would still keep every chunk's float32 softmax alive for the backward
pass, i.e. the whole (B, T, V) float32 copy in pieces. What the backward pass holds is one gradient
in the student logits' own dtype, the size autograd would produce anyway. The teacher never gets a
gradient. A mask (same shape as the logits without V, True = counted) drops positions from the mean
and gives them a zero gradient, whatever their logits hold (NaN padding included); when a mask
keeps no position the loss is 0. Results are the same for every chunk size up to float rounding.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import LlmpruneError

CHUNK_BYTES = 64 * 2**20  # float32 bytes of one chunk of positions' logits (341 positions at V = 49152)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # looked for, in this order, in a folder
RUNTIME_KEYS = ("truncation", "padding")  # tokenizer.json settings that do not change token ids

# A per-position loss on one chunk: the student's logits (c, V) float32 and the chunk's rows of the
# flattened positions -> (c,) losses. Differentiable in the logits.
RowLoss = Callable[[torch.Tensor, slice], torch.Tensor]


# --------------------------------------------------------------------------------------------
# The chunked engine


class _ChunkedMean(torch.autograd.Function):
    """Mean of ``row_loss`` over the kept rows of ``logits`` (N, V), ``rows`` rows at a time."""
    @staticmethod
    def forward(ctx, logits: torch.Tensor, keep: torch.Tensor, row_loss: RowLoss, rows: int,
                want_grad: bool) -> torch.Tensor:
        count = keep.sum().clamp_min(1).float()  # no kept row: loss 0, gradient 0
        grad = torch.empty_like(logits) if want_grad else None  # (N, V), logits' dtype
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            part = slice(start, min(start + rows, logits.shape[0]))
            kept = keep[part]  # (c,)
            chunk = logits[part].detach().float()  # (c, V)
            with torch.enable_grad():
                chunk.requires_grad_(want_grad)
                loss = torch.where(kept, row_loss(chunk, part), 0.0)  # (c,)
                if want_grad:
                    (g,) = torch.autograd.grad(loss.sum(), chunk)  # (c, V)
                    grad[part] = torch.where(kept[:, None], g / count, 0.0)
            total += loss.detach().sum()
        if want_grad:
            ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # The usual case (the loss itself, weight 1) hands the buffer over without a second copy.
        return (grad if bool(grad_out == 1) else grad * grad_out), None, None, None, None


def _chunked_mean(logits: torch.Tensor, keep: torch.Tensor, row_loss: RowLoss, rows: int) -> torch.Tensor:
    # Decided here: inside forward() grad mode is always off and needs_input_grad ignores no_grad().
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    return _ChunkedMean.apply(logits, keep, row_loss, rows, want_grad)


def _rows_per_chunk(vocab: int, chunk: int | None) -> int:
    if chunk is None:
        return max(1, CHUNK_BYTES // (4 * vocab))
    if chunk < 1:
        raise LlmpruneError(f"chunk must be a positive number of positions, got {chunk}")
    return chunk


def _keep(mask: torch.Tensor | None, lead: torch.Size, device: torch.device) -> torch.Tensor:
    """(N,) bool: the positions counted, from a mask shaped like the logits without V."""
    if mask is None:
        return torch.ones(math.prod(lead), dtype=torch.bool, device=device)
    if mask.shape != lead:
        raise LlmpruneError(f"mask has shape {tuple(mask.shape)}, expected {tuple(lead)} (the logits' without V)")
    return mask.to(device=device, dtype=torch.bool).reshape(-1)


def _check_temperature(temperature: float) -> None:
    if not 0 < temperature < math.inf:
        raise LlmpruneError(f"distillation temperature must be a positive number, got {temperature}")


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (c, K) -> (c,); terms where p = 0 count 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


# --------------------------------------------------------------------------------------------
# Full-vocabulary KL


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """T^2 * mean over kept positions of KL(softmax(teacher / T) || softmax(student / T)).

    student_logits and teacher_logits (B, T, V) (any leading dims, any float dtypes, the teacher
    on any device); mask (B, T) bool. ``chunk`` positions are upcast at a time (default: 64 MiB
    of float32). Returns a float32 scalar on the student's device.
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise LlmpruneError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ in shape")
    vocab = student_logits.shape[-1]
    device = student_logits.device
    teacher = teacher_logits.detach().reshape(-1, vocab)  # (N, V)

    def rows(s: torch.Tensor, part: slice) -> torch.Tensor:  # (c, V) -> (c,)
        logq = F.log_softmax(s / temperature, dim=-1)
        logp = F.log_softmax(teacher[part].to(device=device, dtype=torch.float32) / temperature, dim=-1)
        return _kl_rows(logp, logq) * temperature**2

    keep = _keep(mask, student_logits.shape[:-1], device)
    return _chunked_mean(student_logits.reshape(-1, vocab), keep, rows, _rows_per_chunk(vocab, chunk))


# --------------------------------------------------------------------------------------------
# Top-k teacher


@dataclass(frozen=True)
class TopK:
    """A teacher's distribution at ``temperature`` kept as its k most likely tokens plus one bucket.

    indices (B, T, k) int32 or int64, most likely first; logprobs (B, T, k) float16 or float32,
    their log-probabilities; rest (B, T) the log of the probability mass of all other tokens
    together (-inf when k = V). Any leading dims, matching the student's logits without V.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor
    temperature: float

    @property
    def k(self) -> int:
        return self.indices.shape[-1]


@torch.no_grad()
def topk_teacher(
    teacher_logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float16,
    chunk: int | None = None,
) -> TopK:
    """The teacher's ``k`` most likely tokens per position at ``temperature``, for ``kl_topk_loss``.

    teacher_logits (B, T, V) any float dtype. Log-probabilities are computed in float32 and stored
    in ``dtype`` (float16 halves the disk; its rounding is about 1e-3 relative on the kept
    probabilities), indices as int32. Ties between equal logits are broken by ``torch.topk``.
    """
    _check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise LlmpruneError(f"top-k teacher needs 1 <= k <= {vocab} (the vocabulary), got k = {k}")
    lead = teacher_logits.shape[:-1]
    flat = teacher_logits.reshape(-1, vocab)  # (N, V)
    indices = torch.empty(flat.shape[0], k, dtype=torch.int32, device=flat.device)  # (N, k)
    logprobs = torch.empty(flat.shape[0], k, dtype=dtype, device=flat.device)  # (N, k)
    rest = torch.empty(flat.shape[0], dtype=dtype, device=flat.device)  # (N,)
    step = _rows_per_chunk(vocab, chunk)
    for start in range(0, flat.shape[0], step):
        part = slice(start, start + step)
        logp = F.log_softmax(flat[part].float() / temperature, dim=-1)  # (c, V)
        top, idx = logp.topk(k, dim=-1)  # (c, k)
        # The rest's mass summed from its own terms: 1 - sum(top) would cancel when the top is ~1.
        rest[part] = logp.scatter(-1, idx, -math.inf).logsumexp(-1)
        logprobs[part] = top
        indices[part] = idx
    return TopK(indices.reshape(*lead, k), logprobs.reshape(*lead, k), rest.reshape(lead), temperature)


def kl_topk_loss(
    student_logits: torch.Tensor,
    topk: TopK,
    temperature: float | None = None,
    mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """``kl_loss`` against a top-k teacher: T^2 * mean KL over k + 1 buckets.

    The buckets are the teacher's k tokens, each on its own, and every other token together; the
    student's distribution is collapsed to the same buckets (its mass outside the k tokens summed).
    With k = V this is ``kl_loss``. With k < V it never exceeds ``kl_loss`` (the log-sum
    inequality), and equals it when the student's distribution within the rest is proportional to
    the teacher's there. Its gradient on the k kept logits is exactly the full KL's, T * (q - p);
    on the others it is T * q * (1 - p_rest / q_rest): the student keeps the shape of its own tail
    and only scales it to the teacher's rest mass.

    The stored buckets are renormalised in float32 before use, so float16 rounding cannot make the
    teacher's mass differ from 1. ``temperature`` defaults to the one the top-k was computed at;
    another one is refused (the tail cannot be re-tempered). student_logits (B, T, V); mask (B, T).
    """
    if temperature is not None and temperature != topk.temperature:
        raise LlmpruneError(f"the top-k teacher was computed at temperature {topk.temperature}, not {temperature}")
    temperature = topk.temperature
    _check_temperature(temperature)
    vocab, k = student_logits.shape[-1], topk.k
    lead = student_logits.shape[:-1]
    if topk.indices.shape[:-1] != lead or topk.logprobs.shape != topk.indices.shape or topk.rest.shape != lead:
        raise LlmpruneError(f"top-k teacher of shapes indices {tuple(topk.indices.shape)}, logprobs "
                            f"{tuple(topk.logprobs.shape)}, rest {tuple(topk.rest.shape)} does not fit "
                            f"student logits {tuple(student_logits.shape)}")
    if k > vocab:
        raise LlmpruneError(f"top-k teacher keeps {k} tokens but the student's vocabulary has {vocab}")
    device = student_logits.device
    indices = topk.indices.reshape(-1, k)  # (N, k)
    logprobs = topk.logprobs.reshape(-1, k)  # (N, k)
    rest = topk.rest.reshape(-1, 1)  # (N, 1)

    def rows(s: torch.Tensor, part: slice) -> torch.Tensor:  # (c, V) -> (c,)
        logq = F.log_softmax(s / temperature, dim=-1)  # (c, V)
        idx = indices[part].to(device=device, dtype=torch.long)  # (c, k)
        logq_b = logq.gather(-1, idx)  # (c, k)
        logp_b = logprobs[part].to(device=device, dtype=torch.float32)  # (c, k)
        if k < vocab:  # at k = V the rest bucket is empty: its logsumexp over nothing would give NaN gradients
            logq_rest = logq.scatter(-1, idx, -math.inf).logsumexp(-1, keepdim=True)  # (c, 1)
            logq_b = torch.cat([logq_b, logq_rest], dim=-1)  # (c, k + 1)
            logp_b = torch.cat([logp_b, rest[part].to(device=device, dtype=torch.float32)], dim=-1)
        logp_b = logp_b - logp_b.logsumexp(-1, keepdim=True)
        return _kl_rows(logp_b, logq_b) * temperature**2

    keep = _keep(mask, lead, device)
    return _chunked_mean(student_logits.reshape(-1, vocab), keep, rows, _rows_per_chunk(vocab, chunk))


# --------------------------------------------------------------------------------------------
# Hidden states, next-token loss, weighting


def hidden_mse(
    student_hidden: torch.Tensor | Sequence[torch.Tensor],
    teacher_hidden: torch.Tensor | Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SquareHead's normalised MSE: per layer ||s - t||^2 / ||t||^2, averaged over the layers.

    Each layer's pair is (B, T, D) (any leading dims); mask (B, T) bool keeps positions. Per layer
    the norms are sums over every kept element of the whole batch, i.e. MSE(s, t) / MSE(t, 0) as
    in the paper, not a mean of per-sample ratios: a sample whose states happen to be small
    cannot dominate. Layers are averaged where the paper sums, so that a weight means the same
    for a shallow and a deep model (multiply it by the layer count to reproduce the paper).
    Computed in float32, unchunked (D is small next to a vocabulary); float32 scalar on the first
    layer's device. The teacher gets no gradient.
    """
    students = [student_hidden] if isinstance(student_hidden, torch.Tensor) else list(student_hidden)
    teachers = [teacher_hidden] if isinstance(teacher_hidden, torch.Tensor) else list(teacher_hidden)
    if len(students) != len(teachers) or not students:
        raise LlmpruneError(f"hidden_mse needs as many student as teacher layers, at least one; "
                            f"got {len(students)} and {len(teachers)}")
    ratios = []
    for s, t in zip(students, teachers):
        if s.shape != t.shape:
            raise LlmpruneError(f"student hidden states {tuple(s.shape)} and teacher's {tuple(t.shape)} "
                                "differ in shape")
        t = t.detach().to(device=s.device, dtype=torch.float32)  # (B, T, D)
        diff = s.float() - t  # (B, T, D)
        if mask is not None:
            keep = _keep(mask, s.shape[:-1], s.device).reshape(*s.shape[:-1], 1)  # (B, T, 1)
            diff, t = torch.where(keep, diff, 0.0), torch.where(keep, t, 0.0)
        norm = t.square().sum().clamp_min(torch.finfo(torch.float32).tiny)
        ratios.append((diff.square().sum() / norm).to(students[0].device))
    return torch.stack(ratios).mean()


def lm_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Next-token cross entropy: mean over t of -log softmax(logits[:, t])[ids[:, t + 1]].

    logits (B, T, V) any float dtype, ids (B, T) integer; mask (B, T) bool marks real tokens, and
    a prediction counts when both its input and its target are real (left or right padding).
    Chunked like ``kl_loss``; float32 scalar on the logits' device.
    """
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    if ids.shape != lead:
        raise LlmpruneError(f"token ids {tuple(ids.shape)} do not match logits {tuple(logits.shape)}")
    device = logits.device
    keep = _keep(mask, lead, device).reshape(lead)  # (B, T)
    keep = keep & keep.roll(-1, dims=-1)
    keep[..., -1] = False  # the last position predicts nothing (roll wrapped the first id there)
    targets = ids.to(device=device, dtype=torch.long).roll(-1, dims=-1)  # (B, T)
    if bool((keep & ((targets < 0) | (targets >= vocab))).any()):
        raise LlmpruneError(f"token ids must lie in [0, {vocab}), the logits' vocabulary")
    targets = torch.where(keep, targets, 0).reshape(-1)  # (N,)

    def rows(s: torch.Tensor, part: slice) -> torch.Tensor:  # (c, V) -> (c,)
        return F.cross_entropy(s, targets[part], reduction="none")

    return _chunked_mean(logits.reshape(-1, vocab), keep.reshape(-1), rows, _rows_per_chunk(vocab, chunk))


def combined(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum of weights[name] * losses[name]; both must name the same losses (a weight may be 0)."""
    if set(losses) != set(weights) or not losses:
        raise LlmpruneError(f"loss weights name {sorted(weights)} but the losses are {sorted(losses)}")
    return sum(weights[name] * losses[name] for name in sorted(losses))


# --------------------------------------------------------------------------------------------
# Vocabulary check


def _tokenizer_digest(where: str | Path) -> tuple[Path, str]:
    """(file, sha256) of a tokenizer: a tokenizer.json / tokenizer.model, or a folder holding one.

    tokenizer.json is hashed as canonical JSON without its runtime settings (truncation, padding),
    so a re-saved copy of the same tokenizer matches; other files byte for byte.
    """
    path = Path(where)
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            raise LlmpruneError(f"no {' or '.join(TOKENIZER_FILES)} in {path}")
        path = found[0]
    if not path.is_file():
        raise LlmpruneError(f"tokenizer file {path} does not exist")
    content = path.read_bytes()
    if path.suffix == ".json":
        try:
            parsed = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LlmpruneError(f"{path} is not valid JSON: {err}") from err
        if isinstance(parsed, dict):
            parsed = {key: value for key, value in parsed.items() if key not in RUNTIME_KEYS}
        content = json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return path, hashlib.sha256(content).hexdigest()


def check_vocab(
    student_vocab: int,
    teacher_vocab: int,
    student_tokenizer_files: str | Path | None = None,
    teacher_tokenizer_files: str | Path | None = None,
) -> None:
    """Raise LlmpruneError (one line) unless teacher and student share vocabulary and tokenizer.

    Sizes are the models' vocabulary sizes (config.vocab_size, the logits' V). Tokenizers are
    compared when both are given: each a folder holding tokenizer.json (else tokenizer.model) or
    that file itself.
    """
    if student_vocab != teacher_vocab:
        raise LlmpruneError(f"the teacher's vocabulary has {teacher_vocab} tokens and the student's "
                            f"{student_vocab}: distillation needs the student's own teacher")
    if student_tokenizer_files is None or teacher_tokenizer_files is None:
        return
    s_path, s_hash = _tokenizer_digest(student_tokenizer_files)
    t_path, t_hash = _tokenizer_digest(teacher_tokenizer_files)
    if s_hash != t_hash:
        raise LlmpruneError(f"the teacher's tokenizer ({t_path}, sha256 {t_hash[:12]}, {teacher_vocab} tokens) "
                            f"differs from the student's ({s_path}, sha256 {s_hash[:12]}, {student_vocab} "
                            f"tokens): distillation needs the same token ids on both sides")
