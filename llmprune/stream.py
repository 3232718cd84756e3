"""The layer-by-layer engine: load a decoder layer, let a step act on it, write it, free it.

The model is never materialised whole. Tensors outside the decoder layers are copied through one
at a time; each decoder layer's tensors are read (the next layer is read ahead on a worker thread
while the current one is processed), moved to the execution device, handed to the step, and the
step's output is written to the planned shards by another worker. Peak memory is O(three decoder
layers).

A step is any callable ``step(layer) -> dict[name, tensor]`` over a ``Layer``; steps that need
the layer as a module (calibration, block-wise fine-tuning) call ``layer.module()``.

Routed experts stored one tensor per expert but fused in memory (``Layout.plan``) are fused once
when the layer is read, pruned there through each expert's (out, in) view (``Layer.experts``), and
split back into the checkpoint's tensors, names, shapes and dtypes when the layer is written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from .arch import LayerCalls, Layout, Linear, ModelWithoutLayers, materialize
from .checkpoint import Checkpoint, TensorSpec
from .errors import LlmpruneError
from .experts import Expert
from .progress import track
from .shards import ShardWriter
from .source import group_names

log = logging.getLogger(__name__)


@dataclass
class Layer:
    """One decoder layer in flight: its checkpoint tensors, on the execution device."""
    index: int
    tensors: dict[str, torch.Tensor]  # checkpoint name -> tensor (a planned layer: all but its fused experts)
    layout: Layout
    # in-memory name -> expert tensor fused from the checkpoint's per-expert tensors (``Layout.plan``)
    fused: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        plan = self.layout.plan(self.index)
        if plan is None:
            return
        for g in plan.groups:
            if g.fused and g.target not in self.fused and all(n in self.tensors for n in g.sources):
                stored = {n: self.tensors.pop(n) for n in g.sources}
                self.fused.update(plan.to_memory(stored, [g.target]))
                self._check_names(g.target, stored)

    def _check_names(self, target: str, stored: dict[str, torch.Tensor]) -> None:
        """Each expert matrix named after a checkpoint tensor holds exactly that tensor."""
        for expert in self.layout.expert_matrices(self.index):
            if expert.param == target and expert.name in stored:
                if not torch.equal(expert.matrix.view(self.fused[target]), stored[expert.name]):
                    raise LlmpruneError(f"{expert.name} is not {expert.matrix.label} once fused: "
                                        "transformers' conversion changed; update llmprune")

    def linears(self) -> Iterator[tuple[Linear, str]]:
        """The prunable matrices of this layer with their checkpoint names."""
        for linear, name in self.layout.linear_names(self.index):
            if name in self.tensors:
                yield linear, name

    def experts(self) -> Iterator[tuple[Expert, torch.Tensor]]:
        """The routed experts' matrices of this layer, each with its (out, in) view, which writes
        through to the tensor the layer writes."""
        for expert in self.layout.expert_matrices(self.index):
            holder = self.fused.get(expert.param, self.tensors.get(expert.param))
            if holder is not None:
                yield expert, expert.matrix.view(holder)

    def module(self) -> nn.Module:
        """The decoder layer as a real module holding these tensors (shared storage)."""
        prefix = self.layout.checkpoint_name(self.layout.layer_prefix(self.index))
        plan = self.layout.plan(self.index)
        renamed = {} if plan is None else {g.sources[0]: g.target for g in plan.groups if not g.fused}
        state = {renamed.get(name, name)[len(prefix):]: t for name, t in self.tensors.items()}
        state.update((name[len(prefix):], t) for name, t in self.fused.items())
        return materialize(self.layout.layer_module(self.index), state)

    def stored(self, out: dict[str, torch.Tensor], like: Callable[[str], TensorSpec]) -> dict[str, torch.Tensor]:
        """A step's output ``out`` with the fused experts split back into the checkpoint's tensors
        (shapes and dtypes of ``like(name)``); the pieces may be views of the fused tensors."""
        if not self.fused:
            return out
        plan = self.layout.plan(self.index)
        specs = {n: like(n) for target in self.fused for n in plan.group(target).sources}
        return {**out, **plan.to_disk(self.fused, like=specs)}


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        log.debug("glibc malloc controls unavailable; memory may stay resident after layers are freed")
        return None


MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold


def tune_allocator() -> None:
    """Set glibc's allocator up for streaming: fast within a layer, O(layer) across layers.

    Buffers up to 32 MB (a layer's activations per chunk) come from the heap and are reused from
    one operation to the next; above that, and for whole weight matrices of big models, mmap. A
    fixed threshold (rather than glibc's dynamic one) plus a high trim threshold stop glibc from
    returning and re-faulting the same pages on every operation (which cost about a third of the
    run time of a calibrated prune on CPU); ``release_heap`` then gives the dead memory back once
    per layer, so streaming layer after layer does not accumulate it.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: trim only when asked (or past 1 GB free)


def release_heap() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``); called between layers."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class Step(Protocol):
    """What the engine asks of a step: called on each decoder layer in order, it returns the tensors
    to write under their input names (a structured step's ``output_name`` may rename or drop them).
    ``zeros`` counts the zeros of each prunable matrix it wrote, for the report and the journal; a
    step that a resumed run must replay also provides ``resume.ResumableStep``'s methods, and one that
    changes the tensors outside the decoder layers (the hidden width) an ``outside(name, tensor)``
    method returning what to write for each of them."""

    zeros: dict[str, int]

    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]: ...


OnLayer = Callable[[int], "Callable[[], None] | None"]


def output_specs(checkpoint: Checkpoint, layout: Layout, dtype: torch.dtype | None) -> list[TensorSpec]:
    """Specs of the output tensors in write order: tensors outside the layers first, then layers."""
    outside, per_layer = group_names(checkpoint, layout)
    specs = []
    for name in outside + [n for names in per_layer for n in names]:
        spec = checkpoint.spec(name)
        if dtype is not None and spec.dtype.is_floating_point:
            spec = TensorSpec(name, dtype, spec.shape)
        specs.append(spec)
    return specs


def layers(checkpoint: Checkpoint, layout: Layout, device: torch.device, dtype: torch.dtype | None = None,
           desc: str = "layers", progress: bool = True, per_layer: list[list[str]] | None = None,
           start: int = 0) -> Iterator[Layer]:
    """Each decoder layer from ``start`` on, on ``device``, the next one read ahead on a worker thread."""
    if per_layer is None:
        per_layer = group_names(checkpoint, layout)[1]
    tune_allocator()

    def read_layer(index: int) -> dict[str, torch.Tensor]:
        return {name: _convert(checkpoint.read(name), dtype) for name in per_layer[index]}

    with ThreadPoolExecutor(max_workers=1) as reader:
        ahead = reader.submit(read_layer, start) if start < layout.num_layers else None
        for index in track(range(start, layout.num_layers), desc, "layer", enabled=progress, initial=start,
                           total=layout.num_layers):
            tensors = ahead.result()
            ahead = reader.submit(read_layer, index + 1) if index + 1 < layout.num_layers else None
            yield Layer(index, {n: t.to(device, non_blocking=True) for n, t in tensors.items()}, layout)
            del tensors
            release_heap()


def _convert(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def run(checkpoint: Checkpoint, layout: Layout, step: Step, writer: ShardWriter,
        device: torch.device, dtype: torch.dtype | None = None, desc: str = "layers",
        progress: bool = True, start: int = 0, on_layer: OnLayer | None = None) -> None:
    """Stream every tensor of ``checkpoint`` through ``step`` (decoder layers) into ``writer``.

    Layers are processed in the checkpoint's dtype and converted to ``dtype`` when written.
    ``start`` > 0 continues an interrupted run: the tensors outside the layers and layers before
    ``start`` are taken as written. A step with an ``outside`` method maps the tensors outside the
    layers before they are written. ``on_layer(i)`` is called right after the step has processed
    layer i; the callable it returns runs once layer i (and everything before it) is written.
    """
    outside, per_layer = group_names(checkpoint, layout)
    transform = getattr(step, "outside", None)
    if start == 0:
        for name in outside:
            t = checkpoint.read(name)
            writer.write(name, _convert(t if transform is None else transform(name, t), dtype))

    def write_layer(out: dict[str, torch.Tensor], done: Callable[[], None] | None) -> None:
        for name, t in out.items():
            writer.write(name, _convert(t, dtype))
        if done is not None:
            done()

    # A worker writes layer i-1 while layer i is processed (and ``layers`` reads i+1): disk and
    # compute overlap, and at most three layers are in memory.
    with ThreadPoolExecutor(max_workers=1) as writer_pool:
        written = None
        for layer in layers(checkpoint, layout, device, None, desc, progress, per_layer, start):
            out = layer.stored(step(layer), checkpoint.spec)
            done = on_layer(layer.index) if on_layer is not None else None
            if written is not None:
                written.result()
            written = writer_pool.submit(write_layer, out, done)
            del layer, out
        if written is not None:
            written.result()


class Activations:
    """Hidden states entering the current decoder layer for a set of token windows.

    Kept in chunks of ``batch_size`` windows on ``store``: the device, the CPU, or a folder (one
    file per chunk, for calibration sets larger than memory), with what the model passes each
    layer (masks, positions, rotary tables) captured once per chunk size. ``forward`` runs every
    chunk through a layer (for statistics hooks); ``advance`` replaces the states with that
    layer's outputs, for the next layer. Chunks are never modified in place, so a ``snapshot``
    stays valid while later layers run.
    """

    def __init__(self, outer: ModelWithoutLayers, ids: torch.Tensor, batch_size: int, store: torch.device | Path):
        self.device = outer.device
        self.windows: tuple[int, int] = tuple(ids.shape)  # (windows, tokens each)
        self.spill = Path(store) if isinstance(store, (str, Path)) else None
        self.store = torch.device("cpu") if self.spill is not None else store
        if self.spill is not None:
            self.spill.mkdir(parents=True, exist_ok=True)
        self.generation = 0
        self.hidden: list[torch.Tensor | Path] = []
        self.shapes: list[torch.Size] = []
        self.calls: dict[int, LayerCalls] = {}
        for chunk in ids.split(batch_size):
            first, calls = outer.layer_inputs(chunk)
            self.calls.setdefault(chunk.shape[0], calls)
            self.shapes.append(first.shape)
            self.hidden.append(self._keep(len(self.hidden), first))

    def _keep(self, i: int, tensor: torch.Tensor) -> torch.Tensor | Path:
        if self.spill is None:
            return tensor.to(self.store)
        path = self.spill / f"g{self.generation}-{i}.pt"
        torch.save(tensor.to("cpu"), path)
        return path

    def chunk(self, i: int) -> torch.Tensor:
        """Chunk ``i`` (B, T, C) on the execution device."""
        h = self.hidden[i]
        return (torch.load(h, weights_only=True) if isinstance(h, Path) else h).to(self.device)

    @property
    def tokens(self) -> int:
        return sum(s[0] * s[1] for s in self.shapes)

    @torch.no_grad()
    def forward(self, module: nn.Module, index: int, chunks: int | None = None) -> None:
        for i in range(len(self.hidden))[:chunks]:
            h = self.chunk(i)
            self.calls[h.shape[0]].run(module, index, h)

    @torch.no_grad()
    def each_output(self, module: nn.Module, index: int) -> Iterator[torch.Tensor]:
        """The layer's output for each chunk in turn, on the device (one chunk alive at a time)."""
        for i in range(len(self.hidden)):
            h = self.chunk(i)
            yield self.calls[h.shape[0]].run(module, index, h)

    def outputs(self, module: nn.Module, index: int) -> list[torch.Tensor]:
        """The layer's outputs for every chunk, in memory on the store (the CPU when it spills)."""
        return [out.to(self.store) for out in self.each_output(module, index)]

    @torch.no_grad()
    def advance(self, module: nn.Module, index: int) -> None:
        old, self.generation = self.hidden, self.generation + 1
        new = []
        for i in range(len(old)):
            h = self.chunk(i)
            new.append(self._keep(i, self.calls[h.shape[0]].run(module, index, h)))
        self.hidden = new
        for h in old:
            if isinstance(h, Path):
                h.unlink()

    def snapshot(self) -> list[torch.Tensor | Path]:
        """The current states, still valid after later ``advance`` calls (spilled files are linked)."""
        out = []
        for h in self.hidden:
            if isinstance(h, Path):
                link = h.with_name(f"snap-{h.name}")
                os.link(h, link)
                h = link
            out.append(h)
        return out

    @staticmethod
    def save(snapshot: list[torch.Tensor | Path], folder: Path) -> None:
        """Write a snapshot to ``folder`` (one durable file per chunk)."""
        folder.mkdir()
        for i, h in enumerate(snapshot):
            path = folder / f"chunk-{i}.pt"
            if isinstance(h, Path):
                os.replace(h, path)
            else:
                torch.save(h.to("cpu"), path)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())

    def load(self, folder: Path) -> None:
        """Replace the states with those ``save`` wrote (an interrupted run's last layer outputs).

        Chunks saved at another size (the run was interrupted on another device, whose chunking
        differs) are regrouped window by window; one saved chunk is in memory at a time.
        """
        saved = sorted(folder.glob("chunk-*.pt"), key=lambda p: int(p.stem.split("-")[1]))

        def windows() -> Iterator[torch.Tensor]:
            for path in saved:
                yield from torch.load(path, weights_only=True)

        rows = windows()
        for i in range(len(self.hidden)):
            want = self.shapes[i]
            got = [row for _, row in zip(range(want[0]), rows)]
            if len(got) != want[0] or got[0].shape != want[1:]:
                found = tuple(got[0].shape) if got else ()
                raise ValueError(f"saved activations ({len(got)} windows of {found}) do not match {tuple(want)}")
            h = torch.stack(got)
            old, self.hidden[i] = self.hidden[i], self._keep(i, h)
            if isinstance(old, Path) and old != self.hidden[i]:
                old.unlink()
        if next(rows, None) is not None:
            raise ValueError("saved activations hold more windows than this run calibrates with")
