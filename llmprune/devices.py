"""Memory budgets (``--max-memory``): parse them, and size a layer-streaming run against them.

A budget is one size (for the execution device: the GPU, or the CPU when running there) or a
list ``cpu=8GB,cuda=20GB`` (``cuda:1=...`` for one GPU). Without one, what the system reports
free is the limit. Estimates are deliberately simple sums of the big buffers: a decoder layer's
weights, the criterion's statistics, one calibration chunk's intermediate activations, and the
calibration states themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import LlmpruneError

log = logging.getLogger(__name__)

GB = 1e9


def parse_budget(text: str | None) -> dict[str, int]:
    """'20GB' -> {'': 20e9}; 'cpu=8GB,cuda=20GB' -> {'cpu': 8e9, 'cuda': 20e9}."""
    if not text:
        return {}
    out: dict[str, int] = {}
    for part in text.split(","):
        key, sep, size = part.strip().rpartition("=")
        key = key.strip().lower()
        if sep and not (key == "cpu" or key.startswith(("cuda", "mps", "xpu"))):
            raise LlmpruneError(f"--max-memory: unknown device {key!r} in {text!r}: expected e.g. cpu=8GB,cuda=20GB")
        value = parse_size(size)
        if value <= 0:
            raise LlmpruneError(f"--max-memory: {size!r} is not a positive size")
        out[key] = value
    return out


def budget_for(budget: dict[str, int], device: torch.device) -> int | None:
    """The bytes ``budget`` allows on ``device`` (None: no limit given)."""
    for key in (str(device), device.type):
        if key in budget:
            return budget[key]
    return budget.get("")  # a bare size is the execution device's; the CPU's only when running there


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new model: free GPU memory, else the CPU's available RAM (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def limit(device: torch.device, budget: dict[str, int], free: int | None = -1) -> int | None:
    """What a run may use on ``device``: the budget, capped by what is free (``free``: measured already)."""
    values = [v for v in (available_memory(device) if free == -1 else free, budget_for(budget, device))
              if v is not None]
    return min(values) if values else None


def require(what: str, parts: dict[str, int], device: torch.device, budget: dict[str, int]) -> None:
    """Refuse up front, with the numbers, when ``parts`` exceed the budget given for ``device``."""
    allowed = budget_for(budget, device)
    need = sum(parts.values())
    if allowed is not None and need > allowed:
        detail = " + ".join(f"{v / GB:.2f} GB {k}" for k, v in parts.items() if v)
        raise LlmpruneError(f"--max-memory: {what} needs {need / GB:.2f} GB on {device} ({detail}), "
                            f"more than the {allowed / GB:.2f} GB allowed")


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1GiB' / '123' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    digits = s.rstrip("KMGTIB")
    try:
        return int(float(digits) * units[s[len(digits):]])
    except (KeyError, ValueError):
        raise LlmpruneError(f"cannot read size {text!r}: expected e.g. 5GB or 500MB") from None


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlmpruneError(f"--device {name}: no CUDA device is available")
    return device
