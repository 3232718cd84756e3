"""A short fine-tune of a pruned model that keeps its sparsity exactly, split by job: which weights
are masked (masking), the optimiser and schedule (optim), several processes under DDP or FSDP
(processes), a distillation teacher precomputed to disk (teacher), the two training modes (whole,
blockwise), and the run that plans, trains, writes and records (run)."""

from .run import finetune

__all__ = ["finetune"]
