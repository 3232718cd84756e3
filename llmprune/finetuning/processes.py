"""Several processes under accelerate launch or torchrun: ranks, the process group, DDP gradient
sync and FSDP sharding, and the autocast precision.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import find_layers
from ..devices import resolve_device


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


def shard(model: nn.Module, device: torch.device, world: int) -> None:
    """FSDP (fully_shard): every decoder layer, then the rest, sharded across the processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard


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
