"""Whole-model fine-tuning: the model trained as one on next-token loss, under DDP or FSDP when
several processes run, then written tensor by tensor in the input's names and order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..arch import load_whole
from ..config import FinetuneConfig
from ..distill import TopK, hidden_mse, kl_loss, kl_topk_loss, lm_loss
from ..errors import LlmpruneError, one_line
from ..progress import track
from ..shards import make_writer
from ..source import Source
from ..stream import output_specs
from .masking import Masks, cast_keeping_mask, check_finite, mask_changes, select_trainable
from .optim import clip, make_optimizer, make_schedule
from .processes import Processes, autocast, gradient_sync, shard
from .teacher import TopKFile


def _main_only(procs: Processes, progress: bool) -> bool:
    return progress and procs.main


def load_for_training(source: Source, device: torch.device, progress: bool = True) -> nn.Module:
    """The model in float32 (the master weights) on ``device``, in training mode, read tensor by
    tensor under a "load" bar."""

    try:
        model = load_whole(source.layout, source.checkpoint.read, device, torch.float32, progress)
    except LlmpruneError:
        raise
    except Exception as err:  # unsupported architecture, out of memory
        raise LlmpruneError(f"cannot load the model in {source.folder} for training: {one_line(err)}") from None
    model.config.use_cache = False
    return model.train()


def checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing on or off, by the name the installed transformers uses."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def model_linears(layout) -> dict[str, str]:
    """Module path of every prunable linear in the model -> its checkpoint weight name."""
    return {layout.layer_prefix(i) + linear.name: name
            for i in range(layout.num_layers) for linear, name in layout.linear_names(i)}


def model_experts(layout) -> dict[str, list[str]]:
    """Path of every parameter holding routed expert matrices (a fused 3-D tensor, or one expert's
    linear weight) -> the paths of its biases: trained like linears, their zeros kept."""
    out: dict[str, list[str]] = {}
    for i in range(layout.num_layers):
        prefix = layout.layer_prefix(i)
        for expert in layout.expert_matrices(i):
            weight, e = expert.matrix.weight, expert.matrix.expert
            biases = weight.bias_params() if weight.fused else weight.bias_params()[e:e + 1]  # this expert's
            out.setdefault(prefix + expert.matrix.param, [prefix + b for b in biases])
    return out


@dataclass
class WholeRun:
    model: nn.Module
    masks: Masks
    losses: list[float]
    tokens: int
    seconds: float  # the training loop alone
    cpu_seconds: float  # its CPU time, all threads
    teacher_bytes: int = 0  # a teacher beside the student: its weights' bytes in this process


def step_loss(net: nn.Module, ids: torch.Tensor, cfg: FinetuneConfig, teacher: nn.Module | None = None,
              topk: TopK | None = None) -> torch.Tensor:
    """The loss of one micro-batch ``ids`` (B, T): next-token loss (lm), or KL from the teacher's
    next-token distribution at ``cfg.temperature`` (scaled by T^2), from the ``teacher`` model
    beside the student or its precomputed ``topk``; with ``cfg.hidden_weight``, plus that weight
    times SquareHead's normalised MSE of every decoder layer's output (live teacher); lm+distill
    adds the next-token loss."""
    if cfg.loss == "lm":
        return net(input_ids=ids, labels=ids).loss
    hidden = cfg.hidden_weight > 0
    out = net(input_ids=ids, output_hidden_states=hidden)
    logits = out.logits  # (B, T, V)
    if topk is not None:
        loss = kl_topk_loss(logits, topk)
    else:
        with torch.no_grad():
            target = teacher(input_ids=ids, output_hidden_states=hidden)
        loss = kl_loss(logits, target.logits, cfg.temperature)
        if hidden:  # [0] is the embeddings' output, the same on both sides; then each layer's (B, T, C)
            loss = loss + cfg.hidden_weight * hidden_mse(out.hidden_states[1:], target.hidden_states[1:])
        del target
    return loss + lm_loss(logits, ids) if cfg.loss == "lm+distill" else loss


def train_whole(cfg: FinetuneConfig, source: Source, windows: torch.Tensor, device: torch.device,
                precision: str, procs: Processes, progress: bool, teacher: Source | None = None,
                topk: TopKFile | None = None) -> WholeRun:
    """``cfg.steps`` optimiser steps over ``windows`` (steps * batch * accum rows, cycled when fewer).

    For ``cfg.loss`` distill or lm+distill, either ``teacher``: the dense model, run beside the
    student in inference mode (both must fit in memory; sharded like the student under FSDP), or
    ``topk``: its top-k distribution over ``windows``, precomputed."""
    from torch.nn.parallel import DistributedDataParallel

    if cfg.batch_size % procs.world:
        raise LlmpruneError(f"--batch-size {cfg.batch_size} must be a multiple of the {procs.world} processes")
    torch.manual_seed(cfg.seed)
    layout = source.layout
    model = load_for_training(source, device, progress and procs.main)
    if cfg.gradient_checkpointing:
        checkpointing(model, True)
    select_trainable(model, model_linears(layout), cfg.train_norms, model_experts(layout))
    sharded = procs.world > 1 and cfg.distributed == "fsdp"
    if sharded:
        shard(model, device, procs.world)
    weights, trainable = select_trainable(model, model_linears(layout), cfg.train_norms,
                                          model_experts(layout))  # the sharded ones
    masks = Masks(weights)
    optimizer = make_optimizer(trainable, cfg)
    schedule = make_schedule(optimizer, cfg)
    net = model
    if procs.world > 1 and not sharded:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    dense = None
    if teacher is not None:
        dense = load_for_training(teacher, device, progress and procs.main).eval().requires_grad_(False)
        if sharded:
            shard(dense, device, procs.world)
    per_rank = cfg.batch_size // procs.world
    step_rows = cfg.batch_size * cfg.grad_accum
    losses: list[float] = []
    start, cpu = time.perf_counter(), time.process_time()
    bar = track(range(cfg.steps), "fine-tune", "step", enabled=_main_only(procs, progress))
    for step in bar:
        total = 0.0
        for micro in range(cfg.grad_accum):
            first = step * step_rows + micro * cfg.batch_size + procs.rank * per_rank
            rows = torch.arange(first, first + per_rank) % len(windows)
            ids = windows[rows].to(device)  # (B / processes, T)
            target = topk.rows(rows, device) if topk is not None else None
            sync = micro == cfg.grad_accum - 1 or procs.world == 1
            with gradient_sync(net, sync, sharded):
                with autocast(device, precision):
                    loss = step_loss(net, ids, cfg, dense, target) / cfg.grad_accum
                loss.backward()
            total += loss.detach().item()
        masks.mask_grads()
        clip(trainable, cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        masks.apply()
        optimizer.zero_grad(set_to_none=True)
        losses.append(procs.mean(total, device))
        check_finite(losses[-1], step)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
    masks.remove_hooks()
    if cfg.gradient_checkpointing:
        checkpointing(model, False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if sharded:
        model, masks = gather_sharded(model, source, cfg, procs)
    held = 0 if dense is None else sum(p.numel() * p.element_size() for p in dense.parameters())
    return WholeRun(model.eval() if model is not None else None, masks, losses, cfg.steps * step_rows * windows.shape[1],
                    seconds, cpu, held)


def gather_sharded(model: nn.Module, source: Source, cfg: FinetuneConfig, procs: Processes
                   ) -> tuple[nn.Module | None, Masks | None]:
    """The trained weights, gathered whole on the main process into a fresh CPU copy of the model
    whose masks come from the input (every process takes part; the others get None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not procs.main:
        return None, None
    fresh = load_for_training(source, torch.device("cpu"), progress=False)
    weights, _ = select_trainable(fresh, model_linears(source.layout), cfg.train_norms, model_experts(source.layout))
    masks = Masks(weights)
    masks.remove_hooks()
    missing = set(fresh.load_state_dict(full, strict=False).missing_keys)
    lost = [name for name, p in fresh.named_parameters() if p.requires_grad and name in missing]
    if lost:
        raise RuntimeError(f"FSDP state dict lacks trained parameters: {lost[:3]}")
    return fresh, masks


def disk_state(layout, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors under the checkpoint's names and in its layout: tensors that transformers
    converts on load (fused experts, renamed routers) go back through the same conversion."""
    out, planned = {}, {}
    for name, tensor in state.items():
        stored = layout.checkpoint_name(name)
        index = layout.layer_of(stored)
        plan = layout.plan(index) if index is not None else None
        if plan is not None and stored in plan.targets:
            planned.setdefault(index, {})[stored] = tensor
        else:
            out[stored] = tensor
    for index, tensors in planned.items():
        out.update(layout.plan(index).to_disk(tensors))
    return out


def save_whole(run: WholeRun, source: Source, tmp: Path, dtype: torch.dtype, max_shard_size: str,
               progress: bool = True, compressed: dict[str, float] | None = None) -> dict[str, int]:
    """Cast to ``dtype`` keeping the masks exact and write the input checkpoint's tensors, under
    its names and in its order, tensor by tensor under a "save" bar (the matrices of ``compressed``,
    name -> sparsity, in the sparse-bitmask format); returns each masked matrix's zero count."""

    exact = {name: cast_keeping_mask(p, run.masks.pruned[name], dtype) for name, p in run.masks.params.items()}
    model = run.model.to(dtype)
    zeros, changed = {}, 0
    for name, p in run.masks.params.items():
        p.data = exact.pop(name)
        changed += mask_changes(p.data, run.masks.pruned[name])
        zeros[name] = p.numel() - int(torch.count_nonzero(p.data))
    if changed:  # cannot happen: cast_keeping_mask makes the zeros the mask's
        raise RuntimeError(f"{changed} weights left their mask")
    state = disk_state(source.layout, model.state_dict())
    specs = output_specs(source.checkpoint, source.layout, dtype)
    lacking = [spec.name for spec in specs if spec.name not in state]
    if lacking:
        raise RuntimeError(f"the trained model lacks {lacking[0]!r}")
    writer = make_writer(tmp, specs, compressed or {}, max_shard_size)
    try:
        for spec in track(specs, "save", "tensor", enabled=progress):
            writer.write(spec.name, state[spec.name].detach().to("cpu", spec.dtype))
        writer.close()
    finally:
        writer.abort()
    return zeros
