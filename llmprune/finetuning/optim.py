"""The optimiser (AdamW, or bitsandbytes' 8-bit AdamW), the warm-up then cosine schedule, clipping
and the loss summary kept in llmprune.json.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import FinetuneConfig
from ..errors import LlmpruneError

NEED_BNB = "--optim adamw8bit needs bitsandbytes: pip install bitsandbytes (or llmprune[bnb])"


CURVE_POINTS = 50  # losses kept in llmprune.json


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
