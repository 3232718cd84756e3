"""Every memory estimate in one place: what one layer step, whole-model evaluation and fine-tuning
need, and where calibration states live (device, CPU or disk) under a --max-memory budget.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import criteria
from .arch import as_out_in
from .checkpoint import Checkpoint
from .config import FinetuneConfig, PruneConfig
from .devices import GB, limit, parse_budget, require
from .source import Source, capped_seqlen, group_names, prunable_matrices

log = logging.getLogger(__name__)
@dataclass(frozen=True)
class LayerNeeds:
    """The big buffers of one calibrated layer step, in bytes."""
    weights: int  # the largest decoder layer
    stats: int  # criterion statistics for all its linears (SparseGPT's Hessians dominate)
    transient: int  # one calibration chunk through the layer (MLP intermediates, attention)
    states: int  # the calibration hidden states entering a layer, all windows


def activation_store(needs: LayerNeeds, device: torch.device, budget: dict[str, int],
                     spill: Path) -> torch.device | Path:
    """Where calibration states live: the device, the CPU, or files in ``spill``.

    Refuses when one layer (weights in flight, statistics, one chunk) cannot fit even with the
    states elsewhere. The engine holds up to three layers in CPU memory (read ahead, processed,
    being written) and two on the device; ``advance`` keeps old and new states at once.
    """
    cpu = torch.device("cpu")
    on_device = {"for 2 layers in flight": 2 * needs.weights, "of statistics": needs.stats,
                 "for one calibration chunk": needs.transient}
    if device.type != "cpu":
        require("one decoder layer", on_device, device, budget)
        room = limit(device, budget)
        if room is not None and sum(on_device.values()) + 2 * needs.states <= room:
            return device
        in_cpu = {"for 3 layers in flight": 3 * needs.weights}
    else:
        in_cpu = {**on_device, "for 3 layers in flight": 3 * needs.weights}
        in_cpu.pop("for 2 layers in flight")
    require("one decoder layer", in_cpu, cpu, budget)
    room = limit(cpu, budget)
    if room is None or sum(in_cpu.values()) + 2 * needs.states <= room:
        return cpu
    log.info("calibration states (%.2f GB) do not fit in memory: kept on disk in %s", needs.states / GB, spill)
    return spill


CALIB_BATCH = 8  # calibration windows per forward call on an accelerator (and the most on any device)
CPU_CHUNK_TOKENS = 1024  # tokens per forward call on the CPU, where small chunks stay in cache


def calibration_batch(device: torch.device, seqlen: int) -> int:
    """Calibration windows per forward call: 8 on an accelerator; on the CPU about 1024 tokens,
    measured 1.25x faster than 8 x 512 tokens for a SmolLM2 Wanda prune (elementwise operations
    on a chunk's activations then run from cache)."""
    if device.type != "cpu":
        return CALIB_BATCH
    return max(1, min(CALIB_BATCH, CPU_CHUNK_TOKENS // max(seqlen, 1)))


def largest_layer(source: Source, itemsize: int | None = None) -> int:
    """Bytes of the largest decoder layer's tensors: as stored, or at ``itemsize`` bytes an element."""
    spec = source.checkpoint.spec
    per_layer = group_names(source.checkpoint, source.layout)[1]
    size = (lambda n: spec(n).nbytes) if itemsize is None else (lambda n: math.prod(spec(n).shape) * itemsize)
    return max((sum(size(n) for n in names) for names in per_layer), default=0)


def layer_needs(cfg: PruneConfig, source: Source) -> LayerNeeds:
    """The big buffers of one layer step of ``cfg``, from the checkpoint's shapes and config."""
    criterion = criteria.get(cfg.method) if cfg.method in criteria.names() else None  # None: expert scores
    calibrated = criterion is None or criterion.needs_calibration or cfg.ratios == "owl"
    spec = source.checkpoint.spec
    weights = largest_layer(source)
    stats_bytes = getattr(criterion, "stats_bytes", None)
    stats = 0
    for index in range(source.layout.num_layers):
        shapes = [as_out_in(torch.empty(spec(n).shape, device="meta"), lin).shape
                  for lin, n in source.layout.linear_names(index) if n in source.checkpoint.location]
        work = 3 * max((spec(n).nbytes for _, n in source.layout.linear_names(index)
                        if n in source.checkpoint.location), default=0)  # scores, mask, pruned copy
        stats = max(stats, work + (sum(stats_bytes(*s) for s in shapes) if stats_bytes and calibrated else 0))
    text = source.layout.config.get_text_config()
    hidden = getattr(text, "hidden_size", 0)
    itemsize = spec(source.checkpoint.names[0]).dtype.itemsize
    seqlen = capped_seqlen(source, cfg.seqlen)
    width = 4 * hidden + 3 * (getattr(text, "intermediate_size", None) or 4 * hidden)
    transient = CALIB_BATCH * seqlen * width * itemsize if calibrated else 0
    states = cfg.nsamples * seqlen * hidden * itemsize if calibrated else 0
    return LayerNeeds(weights, stats, transient, states)


def calibration_store(cfg: PruneConfig, source: Source, device: torch.device) -> torch.device:
    """Where calibration states live for passes that do not spill to disk (structured, sensitivity):
    the device when they fit its budget, else the CPU."""
    store = activation_store(layer_needs(cfg, source), device, parse_budget(cfg.max_memory), Path(os.devnull))
    return store if isinstance(store, torch.device) else torch.device("cpu")


ACTIVATIONS_ON_DEVICE_SHARE = 0.3  # block-wise states stay on the GPU within this share of free memory


def activations_store(device: torch.device, ids: torch.Tensor, hidden: int, targets: str) -> torch.device:
    """Block-wise keeps two or three sets of states (inputs, outputs, targets): on the GPU when they fit its share."""
    if device.type != "cuda":
        return device
    need = (3 if targets == "dense-model" else 2) * ids.numel() * hidden * 4
    return device if need < ACTIVATIONS_ON_DEVICE_SHARE * torch.cuda.mem_get_info(device)[0] else torch.device("cpu")


def training_bytes(source: Source, cfg: FinetuneConfig, seqlen: int, teacher: int = 0) -> int:
    """Rough whole-model training memory: float32 weights, gradients and optimiser state of the
    trained matrices, masks, per-micro-batch activations and logits, and ``teacher`` bytes for a
    teacher beside the student (``teacher_bytes``)."""
    total = _numel(source.checkpoint)
    trained = sum(m.numel for m in prunable_matrices(source))
    state = 2 if cfg.optim == "adamw8bit" else 8
    config = source.layout.config.get_text_config()
    tokens = cfg.batch_size * seqlen
    per_layer = 4 if cfg.gradient_checkpointing else 24  # saved activations per token, in hidden sizes
    acts = tokens * config.hidden_size * 4 * (per_layer * source.layout.num_layers)
    logits = 3 * tokens * config.vocab_size * 4
    return 4 * total + (4 + state + 1) * trained + acts + logits + teacher


def _numel(checkpoint: Checkpoint) -> int:
    return sum(checkpoint.spec(n).nbytes // checkpoint.spec(n).dtype.itemsize for n in checkpoint.names)


def teacher_bytes(dense: Source, cfg: FinetuneConfig, seqlen: int) -> int:
    """The dense teacher run beside the student: its float32 weights, its logits for one
    micro-batch and, with --hidden-weight, every layer's output states for it."""
    config = dense.layout.config.get_text_config()
    tokens = cfg.batch_size * seqlen
    hidden = (dense.layout.num_layers + 1) * tokens * config.hidden_size * 4 if cfg.hidden_weight > 0 else 0
    return 4 * _numel(dense.checkpoint) + tokens * config.vocab_size * 4 + hidden


def topk_file_bytes(windows: int, seqlen: int, k: int) -> int:
    """The top-k teacher file: int32 indices and float16 log-probabilities for k tokens, and the
    float16 log of the rest's mass, for every position of every training window."""
    return windows * seqlen * (6 * k + 2)


def topk_layer_needs(dense: Source, windows: int, seqlen: int, batch: int) -> LayerNeeds:
    """The big buffers of the top-k precompute, in float32: one teacher layer; the embeddings and
    head, resident throughout (where a criterion's statistics would be); one chunk of windows
    through a layer and its logits; the states of every training window between layers."""
    config = dense.layout.config.get_text_config()
    width = 4 * config.hidden_size + 3 * (getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
    transient = batch * seqlen * (width + 2 * config.vocab_size) * 4
    outside = group_names(dense.checkpoint, dense.layout)[0]
    resident = sum(4 * dense.checkpoint.spec(n).nbytes // dense.checkpoint.spec(n).dtype.itemsize for n in outside)
    return LayerNeeds(largest_layer(dense, itemsize=4), resident, transient, windows * seqlen * config.hidden_size * 4)


def topk_memory(needs: LayerNeeds, store: torch.device | Path) -> int:
    """The top-k precompute's estimated peak in bytes (``activation_store``'s sum), states included
    unless they wait on disk."""
    return 3 * needs.weights + needs.stats + needs.transient + (0 if isinstance(store, Path) else 2 * needs.states)


def choose_teacher(cfg: FinetuneConfig, source: Source, dense: Source, device: torch.device, seqlen: int) -> str:
    """live or topk (auto: live when student and teacher train together within the memory budget,
    as ``choose_mode`` judges whole-model training); ``--hidden-weight`` needs it live."""
    if cfg.teacher_mode != "auto":
        return cfg.teacher_mode
    if cfg.hidden_weight > 0:
        return "live"
    budget = parse_budget(cfg.max_memory)
    need = training_bytes(source, cfg, seqlen, teacher_bytes(dense, cfg, seqlen))
    free = limit(device, budget)
    mode = "live" if free is None or need <= WHOLE_MODEL_SHARE * free else "topk"
    log.info("teacher %s: student and live teacher need about %.2f GB, %s available", mode, need / 1e9,
             "unknown" if free is None else f"{free / 1e9:.2f} GB")
    return mode


def blockwise_layer_bytes(source: Source, cfg: FinetuneConfig, seqlen: int) -> dict[str, int]:
    """The big buffers of training one decoder layer: float32 sparse and dense copies, the trained
    matrices' gradients and optimiser state, and one micro-batch's saved activations."""
    numel = largest_layer(source, itemsize=1)
    state = 2 if cfg.optim == "adamw8bit" else 8
    hidden = source.layout.config.get_text_config().hidden_size
    return {"of layer weights, gradients and optimiser state": numel * (4 * 3 + state + 1),
            "for one micro-batch": cfg.batch_size * seqlen * hidden * 4 * 24}


WHOLE_MODEL_SHARE = 0.7  # whole-model evaluation or training when its memory fits in this share of what is free
HIDDEN_ON_DEVICE_SHARE = 0.5  # streamed: hidden states stay on the device within this share of free memory


def choose_stream(weight_bytes: int, available_bytes: int | None) -> bool:
    """Stream when the weights take more than WHOLE_MODEL_SHARE of the available memory."""
    if available_bytes is None:
        return False
    return weight_bytes > WHOLE_MODEL_SHARE * available_bytes


def weight_bytes(checkpoint: Checkpoint, dtype: torch.dtype) -> int:
    """Size of the checkpoint's tensors once floating ones are cast to ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name in checkpoint.names:
        spec = checkpoint.spec(name)
        total += spec.nbytes // spec.dtype.itemsize * size if spec.dtype.is_floating_point else spec.nbytes
    return total


@torch.inference_mode()
def check_budget(source: Source, stream: bool, batch: int, seqlen: int, device: torch.device, dtype: torch.dtype,
                 budget: dict[str, int]) -> None:
    """Refuse up front when the chosen mode cannot fit ``--max-memory``."""
    logits = batch * seqlen * source.layout.config.get_text_config().vocab_size * 4
    if not stream:
        require("whole-model evaluation", {"of weights": weight_bytes(source.checkpoint, dtype), "of logits": logits},
                device, budget)
        return
    layer = largest_layer(source, itemsize=torch.empty((), dtype=dtype).element_size())
    require("streamed evaluation", {"for 2 layers in flight": 2 * layer, "of logits": logits}, device, budget)


def parking(device: torch.device, needed: int) -> torch.device:
    """Where ``needed`` bytes of hidden states wait between layers: the device when they fit its share, else the CPU."""
    if device.type != "cuda":
        return device
    return device if needed <= HIDDEN_ON_DEVICE_SHARE * torch.cuda.mem_get_info(device)[0] else torch.device("cpu")


def choose_mode(cfg: FinetuneConfig, source: Source, device: torch.device, seqlen: int, teacher: int = 0) -> str:
    """whole or blockwise (auto: whole when training fits, with ``teacher`` bytes of a teacher beside
    the student); refuses when ``--max-memory`` fits neither."""
    budget = parse_budget(cfg.max_memory)
    need = training_bytes(source, cfg, seqlen, teacher)
    if cfg.mode == "auto":
        free = limit(device, budget)
        mode = "whole" if free is None or need <= WHOLE_MODEL_SHARE * free else "blockwise"
        log.info("%s mode: training needs about %.2f GB, %s available", mode, need / 1e9,
                 "unknown" if free is None else f"{free / 1e9:.2f} GB")
    else:
        mode = cfg.mode
    if mode == "whole":
        require("whole-model fine-tuning", {"for weights, gradients, optimiser state and activations": need - teacher,
                                            "for the teacher beside the student": teacher}, device, budget)
    else:
        require("block-wise fine-tuning of one layer", blockwise_layer_bytes(source, cfg, seqlen), device, budget)
    return mode
