"""Where the dense teacher of a distillation fine-tune lives when it does not run beside the student:
its top-k next-token distribution over the training windows, precomputed once to disk.

The dense model is streamed layer by layer (``stream.layers``, ``stream.Activations``): every
training window passes through decoder layer i before layer i + 1 is read, then the head turns the
last states into logits one chunk of windows at a time, and ``distill.topk_teacher`` keeps each
position's k most likely tokens and the log of the rest's mass. Memory is O(one teacher layer +
the states of the training windows), the states waiting on the device, the CPU or disk under the
memory budget (``sizing.activation_store``), so a teacher far larger than memory never has to fit.

On disk (a folder in the run's partial output): ``indices.bin`` int32 (n, T, k), ``logprobs.bin``
float16 (n, T, k), ``rest.bin`` float16 (n, T), raw row-major, memory-mapped when read so a
micro-batch reads only its rows; ``meta.json``, written last, names what they were computed from,
so a rerun of the same fine-tune reuses a complete file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch import ModelWithoutLayers
from ..config import FinetuneConfig
from ..devices import parse_budget
from ..distill import TopK, topk_teacher
from ..progress import track
from ..recipe import peak_rss_mb
from ..sizing import activation_store, calibration_batch, topk_file_bytes, topk_layer_needs, topk_memory
from ..source import Source, input_identity
from ..stream import Activations, layers
from .processes import autocast

log = logging.getLogger(__name__)

FILES = {"indices": torch.int32, "logprobs": torch.float16, "rest": torch.float16}


@dataclass
class TopKFile:
    """The precomputed teacher: ``rows(r)`` gives windows ``r``'s TopK for ``kl_topk_loss``."""

    folder: Path
    windows: int
    seqlen: int
    k: int
    temperature: float

    def __post_init__(self) -> None:
        self._maps: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, write: bool = False) -> torch.Tensor:
        """File ``name`` memory-mapped as (n, T, k) (rest: (n, T)); ``write``: changes reach the file."""
        shape = (self.windows, self.seqlen) + ((self.k,) if name != "rest" else ())
        if write or name not in self._maps:
            mapped = torch.from_file(str(self.folder / f"{name}.bin"), shared=write, size=math.prod(shape),
                                     dtype=FILES[name]).view(shape)
            if write:
                return mapped
            self._maps[name] = mapped
        return self._maps[name]

    def rows(self, rows: torch.Tensor, device: torch.device) -> TopK:
        """The teacher's top-k for windows ``rows`` (B,), on ``device`` (only those rows are read)."""
        parts = {name: self.tensor(name)[rows].to(device) for name in FILES}
        return TopK(parts["indices"], parts["logprobs"], parts["rest"], self.temperature)

    @property
    def nbytes(self) -> int:
        return sum((self.folder / f"{name}.bin").stat().st_size for name in FILES)


def topk_key(dense: Source, windows: torch.Tensor, cfg: FinetuneConfig, precision: str) -> str:
    """What the file's contents depend on: the teacher, the windows, k, temperature and precision."""
    blob = json.dumps({"teacher": input_identity(dense), "k": cfg.teacher_topk, "temperature": cfg.temperature,
                       "precision": precision, "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def open_topk(folder: Path, key: str) -> TopKFile | None:
    """The complete file in ``folder`` computed for ``key``, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    return TopKFile(folder, meta["windows"], meta["seqlen"], meta["k"], meta["temperature"])


@torch.no_grad()
def precompute_topk(dense: Source, windows: torch.Tensor, cfg: FinetuneConfig, device: torch.device,
                    precision: str, folder: Path, progress: bool = True) -> tuple[TopKFile, dict]:
    """Stream the dense model over ``windows`` (n, T) into a top-k file in ``folder``; returns it and
    a report (seconds, where the states waited, the estimate and the measured peak memory)."""
    key = topk_key(dense, windows, cfg, precision)
    found = open_topk(folder, key)
    if found is not None:
        log.info("reusing the teacher's top-%d file in %s", found.k, folder)
        return found, {"reused": True, "file_bytes": found.nbytes}
    start = time.perf_counter()
    n, seqlen = windows.shape
    k = min(cfg.teacher_topk, dense.layout.config.get_text_config().vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    batch = calibration_batch(device, seqlen)
    needs = topk_layer_needs(dense, n, seqlen, batch)
    store = activation_store(needs, device, parse_budget(cfg.max_memory), folder / "spill")
    out = TopKFile(folder, n, seqlen, k, cfg.temperature)
    for name, dtype in FILES.items():
        with open(folder / f"{name}.bin", "wb") as f:
            f.truncate(n * seqlen * (k if name != "rest" else 1) * dtype.itemsize)
    targets = {name: out.tensor(name, write=True) for name in FILES}
    outer = ModelWithoutLayers(dense.layout, dense.checkpoint.read, device, torch.float32)
    with autocast(device, precision):
        acts = Activations(outer, windows, batch, store)
        for layer in layers(dense.checkpoint, dense.layout, device, torch.float32, desc="teacher top-k",
                            progress=progress):
            acts.advance(layer.module().eval(), layer.index)
            del layer
        first = 0
        for i, ids in enumerate(track(windows.split(batch), "teacher logits", "batch", enabled=progress)):
            logits = outer.logits(ids, acts.chunk(i))  # (B, T, V)
            top = topk_teacher(logits, k, cfg.temperature)  # (B, T, k), (B, T, k), (B, T)
            rows = slice(first, first + len(ids))
            for name in FILES:
                targets[name][rows] = getattr(top, name).cpu()
            first += len(ids)
            del logits, top
    del targets, acts, outer
    shutil.rmtree(folder / "spill", ignore_errors=True)
    for name in FILES:
        with open(folder / f"{name}.bin", "rb+") as f:
            os.fsync(f.fileno())
    meta = {"key": key, "windows": n, "seqlen": seqlen, "k": k, "temperature": cfg.temperature}
    (folder / "meta.json").write_text(json.dumps(meta))
    report = {"reused": False, "seconds": round(time.perf_counter() - start, 2), "file_bytes": out.nbytes,
              "estimate_file_bytes": topk_file_bytes(n, seqlen, k),
              "states": "disk" if isinstance(store, Path) else str(store),
              "memory_estimate_bytes": topk_memory(needs, store),
              "peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out, report
