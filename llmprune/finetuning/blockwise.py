"""Block-wise fine-tuning: on the layer stream, each sparse decoder layer trained to reproduce the
dense layer's outputs, then written; memory of one layer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import resume
from ..arch import ModelWithoutLayers
from ..config import FinetuneConfig
from ..errors import LlmpruneError
from ..faults import fault_point
from ..shards import make_writer
from ..sizing import activations_store
from ..source import Source, group_names
from ..stream import Activations, Layer, layers, output_specs, run
from .masking import Masks, cast_keeping_mask, check_finite, mask_changes, select_trainable
from .optim import clip, make_optimizer, make_schedule
from .processes import autocast

log = logging.getLogger(__name__)
BLOCKWISE_NSAMPLES = 64  # calibration windows for block-wise mode when nsamples is not given


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
        fused = {n: t.to(torch.float32, copy=True) for n, t in layer.fused.items()}  # experts fused in memory
        module = Layer(layer.index, work, layer.layout, fused).module().eval()  # eval: no dropout in a regression
        linears = {lin.name: name for lin, name in layer.linears()}
        experts = layer_experts(layer)
        weights, trainable = select_trainable(module, linears, self.cfg.train_norms,
                                              {path: biases for path, (_, biases) in experts.items()})
        masks = Masks({experts[k][0] if k in experts else k: w for k, w in weights.items()})
        before = mse(self.outputs(module, layer.index, self.acts.hidden), targets)
        losses = self.train(module, layer.index, targets, masks, trainable)
        masks.remove_hooks()
        for p in module.parameters():
            p.requires_grad_(False)
        outputs = self.outputs(module, layer.index, self.acts.hidden)
        after = mse(outputs, targets)
        reverted = not after < before  # never write a layer worse than it came (e.g. --lr too high)
        if reverted:
            for name, t in [*layer.tensors.items(), *layer.fused.items()]:
                (fused if name in fused else work)[name].copy_(t)
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
        for name, t in layer.fused.items():  # written back in place: the engine splits them into the stored tensors
            t.copy_(cast_keeping_mask(fused[name], masks.pruned[name], t.dtype) if name in masks.pruned else fused[name])
            if name in masks.pruned:
                self.changed += mask_changes(t, masks.pruned[name])
                self.zeros[name] = t.numel() - int(torch.count_nonzero(t))
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


def layer_experts(layer: Layer) -> dict[str, tuple[str, list[str]]]:
    """The routed expert parameters of ``layer`` (path in the layer module -> the name its mask goes
    by, the paths of its biases): the checkpoint tensor's name, or the fused tensor's in-memory name
    for experts stored per expert and fused on load (``Layer.fused``)."""
    layout, prefix = layer.layout, layer.layout.layer_prefix(layer.index)
    stored = layout.checkpoint_name(prefix)
    plan = layout.plan(layer.index)
    renamed = {} if plan is None else {g.sources[0]: g.target for g in plan.groups if not g.fused}
    by_path = {renamed.get(name, name)[len(stored):]: name for name in layer.tensors}
    out: dict[str, tuple[str, list[str]]] = {}
    for expert in layout.expert_matrices(layer.index):
        weight, e, path = expert.matrix.weight, expert.matrix.expert, expert.matrix.param
        biases = weight.bias_params() if weight.fused else weight.bias_params()[e:e + 1]  # this expert's
        out.setdefault(path, (prefix + path if prefix + path in layer.fused else by_path[path], biases))
    return out


def mse(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean squared error over every element of every chunk."""
    total = sum(float(F.mse_loss(y.float(), t.float(), reduction="sum")) for y, t in zip(outputs, targets))
    return total / sum(t.numel() for t in targets)


def check_same_layout(sparse: Source, dense: Source) -> None:
    """The dense model must be the sparse one's origin: same layers, same tensor names and shapes."""
    a, b = group_names(sparse.checkpoint, sparse.layout)[1], group_names(dense.checkpoint, dense.layout)[1]
    if len(a) != len(b):
        raise LlmpruneError(f"the dense model has {len(b)} decoder layers, the pruned one {len(a)}")
    for names_a, names_b in zip(a, b):
        shapes_a = {n: sparse.checkpoint.spec(n).shape for n in names_a}
        shapes_b = {n: dense.checkpoint.spec(n).shape for n in names_b}
        if shapes_a != shapes_b:
            raise LlmpruneError(f"the dense model {dense.folder} does not match the pruned one (decoder layer tensors differ)")


@dataclass
class BlockwiseStates:
    """The states a resumed block-wise run needs after a layer, for the journal: the sparse model's
    (the next layer's inputs) and, for dense-model targets, the dense model's."""

    step: BlockwiseStep

    def snapshot(self) -> tuple[list, list]:
        return self.step.acts.snapshot(), list(self.step.dense_hidden or [])

    @staticmethod
    def save(snapshot: tuple[list, list], folder: Path) -> None:

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
                  journal: resume.Journal, compressed: dict[str, float] | None = None) -> BlockwiseStep:
    """Train and write every layer into ``tmp``, continuing after the journal's last completed layer
    (the matrices of ``compressed``, name -> sparsity, in the sparse-bitmask format)."""
    check_same_layout(source, dense)
    outer = ModelWithoutLayers(source.layout, source.checkpoint.read, device, torch.float32)
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
    writer = make_writer(tmp, specs, compressed or {}, cfg.max_shard_size, (journal.writer or {}) if done else None)
    try:
        if done:
            journal.verify(writer, per_layer[done - 1])
            writer.mark_written(outside + [n for names in per_layer[:done] for n in names])
            journal.restore(step)
            states.load(journal.state_dir / journal.states_folder)
        run(source.checkpoint, source.layout, step, writer, device, out_dtype, desc="fine-tune (block-wise)",
            progress=progress, start=done, on_layer=journal.on_layer(writer, per_layer, outside, step, states))
        writer.close()
    finally:
        writer.abort()
        dense_layers.close()
    if step.changed:  # cannot happen: cast_keeping_mask makes the zeros the mask's
        raise RuntimeError(f"{step.changed} weights left their mask")
    return step
