"""The mask invariant of fine-tuning: which weights are pruned, their gradients masked, their values
re-zeroed after each step, and a cast that keeps the written zeros exactly the input's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LlmpruneError


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


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the families' own *Norm classes."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


def norm_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{name}.{pname}" if name else pname: p for name, sub in module.named_modules() if is_norm(sub)
            for pname, p in sub.named_parameters(recurse=False)}


def select_trainable(module: nn.Module, linears: dict[str, str], train_norms: bool,
                     experts: dict[str, list[str]] | None = None) -> tuple[dict[str, nn.Parameter], list[nn.Parameter]]:
    """Freeze ``module`` except the listed linears (model-relative module path -> key) and routed
    expert parameters (parameter path, which is also its key -> the paths of its biases).

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
    for path, biases in (experts or {}).items():  # routed experts' parameters (3-D when fused), masked by name
        if any(module.get_parameter(path) is w for w in weights.values()):
            continue  # an expert that is an nn.Linear the linear rule already lists
        weights[path] = module.get_parameter(path)
        trainable += [weights[path], *(module.get_parameter(b) for b in biases)]
    if train_norms:
        trainable += [p for p in norm_parameters(module).values() if p.dtype.is_floating_point]
    for p in trainable:
        p.requires_grad_(True)
    return weights, trainable
