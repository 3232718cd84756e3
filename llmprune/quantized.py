"""Quantized input checkpoints, read dequantized: each quantized weight is presented under its
plain name in the compute dtype and its scale tensors are hidden, so everything above the reader
sees an ordinary checkpoint. Two documented formats are read:

* ``"quant_method": "fp8"`` (transformers' ``FineGrainedFP8Config``; DeepSeek-V3, Qwen3-*-FP8):
  ``X.weight`` is float8 (out, in) and ``X.weight_scale_inv`` float32 (ceil(out/b0), ceil(in/b1))
  for ``weight_block_size`` [b0, b1] (one scalar when the block size is null); the weight is
  ``float32(X.weight) * scale_inv`` with each scale covering its b0 x b1 block, cut at the edges.
* ``"quant_method": "mxfp4"`` (gpt-oss experts): ``X_blocks`` uint8 (E, R, G, 16) holds two E2M1
  values per byte and ``X_scales`` uint8 (E, R, G) one E8M0 exponent (2**(s - 127)) per 32
  values; the weight is ``X`` (E, 32 G, R), unpacked by transformers' own function.

Every other ``quantization_config`` (GPTQ, AWQ, bitsandbytes, compressed-tensors, ...) is refused
by name: its bytes are not weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .errors import LlmpruneError

FP8, MXFP4 = "fp8", "mxfp4"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_SCALE = ".weight_scale_inv"
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
MX_GROUP = 32  # values per E8M0 scale; 16 bytes of two E2M1 values each
OWN_METHODS = ("llmprune-sparse",)  # llmprune's own compressed format (llmprune.sparse), not a quantization

# quant_method -> the name a person knows the format by
NAMES = {"gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed-tensors",
         "aqlm": "AQLM", "quanto": "Quanto", "eetq": "EETQ", "hqq": "HQQ", "torchao": "torchao", "gguf": "GGUF",
         "fbgemm_fp8": "FBGEMM FP8", "bitnet": "BitNet", "higgs": "HIGGS", "vptq": "VPTQ", "spqr": "SpQR",
         "fp_quant": "FP-Quant", "quark": "Quark", "auto-round": "AutoRound", "mxfp8": "MXFP8"}


@dataclass(frozen=True)
class Format:
    """A quantized input format llmprune reads, and the dtype its weights are dequantized to."""
    method: str  # FP8 or MXFP4
    dtype: torch.dtype  # the compute dtype: config.json's dtype, else bfloat16
    block: tuple[int, int] | None = None  # FP8 only: rows x columns sharing one scale; None for one per tensor

    def describe(self) -> str:
        if self.method == MXFP4:
            return "MXFP4 (E2M1, 32-value blocks with E8M0 scales)"
        return f"FP8 (block {self.block[0]}x{self.block[1]})" if self.block else "FP8 (per-tensor scale)"

    @property
    def summary(self) -> str:
        """The line the log, llmprune.json and the model card give, e.g.
        "input FP8 (block 128x128) dequantized to bfloat16"."""
        return f"input {self.describe()} dequantized to {str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class Quantized:
    """One dequantized weight: its plain name and shape, and the stored tensors it is made of."""
    name: str
    values: str  # the float8 weight, or the MXFP4 ``_blocks``
    scales: str
    shape: tuple[int, ...]


def config_format(config: dict, where: str = "config.json") -> Format | None:
    """The quantized format a ``config.json`` dict declares; None when it declares none (or
    llmprune's own sparse format). Refuses every other method, and FP8 variants not read here."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        text = config.get("text_config")
        qc = text.get("quantization_config") if isinstance(text, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") in OWN_METHODS:
        return None
    method = str(qc.get("quant_method"))
    dtype = _compute_dtype(config, where)
    if method == MXFP4:
        return Format(MXFP4, dtype)
    if method != FP8:
        name = NAMES.get(method, method)
        if method == "bitsandbytes":
            name += " 4-bit" if qc.get("load_in_4bit") else " 8-bit" if qc.get("load_in_8bit") else ""
        elif method == "compressed-tensors" and qc.get("format"):
            name += f" {qc['format']}"
        raise LlmpruneError(f"{where}: {name} quantized weights (quant_method {method!r}) cannot be read; llmprune "
                            "dequantizes only FP8 block-scaled ('fp8') and MXFP4 ('mxfp4') inputs")
    unsupported = (("activation_scheme", "dynamic", "static activation scales"), ("scale_fmt", "float", "UE8M0 scales"),
                   ("expert_dtype", "fp8", "FP4 experts"))
    for key, plain, what in unsupported:
        if str(qc.get(key, plain)).lower() != plain:
            raise LlmpruneError(f"{where}: FP8 with {what} ({key} {qc[key]!r}) cannot be read; llmprune dequantizes "
                                "FP8 with float block scales and dynamic activations only")
    block = qc.get("weight_block_size", [128, 128])
    if block is not None and (not isinstance(block, (list, tuple)) or len(block) != 2
                              or not all(isinstance(b, int) and b > 0 for b in block)):
        raise LlmpruneError(f"{where}: FP8 weight_block_size {block!r} is not two positive integers")
    return Format(FP8, dtype, tuple(block) if block is not None else None)


def _compute_dtype(config: dict, where: str) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise LlmpruneError(f"{where}: dtype {name!r} is not a floating dtype to dequantize to")
    return dtype


def folder_format(folder: Path) -> Format | None:
    """The quantized format of the checkpoint in ``folder`` (None when plain or without config)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LlmpruneError(f"cannot read {path}") from None
    return config_format(config, str(path)) if isinstance(config, dict) else None


def plain_config(config: dict) -> dict:
    """``config`` as an unquantized checkpoint's: without an FP8 or MXFP4 ``quantization_config``,
    with the dtype its weights were dequantized to."""
    fmt = config_format(config)
    if fmt is None:
        return config
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = {k: v for k, v in out["text_config"].items() if k != "quantization_config"}
    out["dtype"] = str(fmt.dtype).removeprefix("torch.")
    return out


def plan(fmt: Format, stored: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, Quantized]:
    """Each quantized weight among the ``stored`` tensors (name -> (dtype, shape)) by its plain name.

    Refuses a scale without its weight, a float8 weight without its scale, and shapes the format
    does not allow: quantized bytes are never passed on as weights.
    """
    out = {}
    if fmt.method == FP8:
        for name, (dtype, shape) in stored.items():
            if name.endswith(FP8_SCALE):
                weight = name[: -len("_scale_inv")]
                if weight not in stored:
                    raise LlmpruneError(f"{name} has no weight {weight!r} to scale")
                out[weight] = Quantized(weight, weight, name, stored[weight][1])
                _check_fp8(out[weight], stored, fmt)
            elif dtype in FP8_DTYPES and name + "_scale_inv" not in stored:
                raise LlmpruneError(f"{name} is stored as {str(dtype)[6:]} without {name}_scale_inv: "
                                    "its scale is missing")
        return out
    for name, (dtype, shape) in stored.items():
        if name.endswith(MX_BLOCKS):
            plain = name[: -len(MX_BLOCKS)]
            scales = plain + MX_SCALES
            if scales not in stored:
                raise LlmpruneError(f"{name} has no {scales!r}: MXFP4 blocks need their scales")
            if len(shape) != 4 or shape[-1] != MX_GROUP // 2 or stored[scales][1] != shape[:-1] \
                    or dtype != torch.uint8 or stored[scales][0] != torch.uint8:
                raise LlmpruneError(f"{name} {dtype} {shape} and {scales} {stored[scales][0]} {stored[scales][1]} are "
                                    "not MXFP4 experts: uint8 (E, R, G, 16) blocks and uint8 (E, R, G) scales")
            experts, rows, groups, _ = shape
            out[plain] = Quantized(plain, name, scales, (experts, groups * MX_GROUP, rows))
        elif name.endswith(MX_SCALES) and name[: -len(MX_SCALES)] + MX_BLOCKS not in stored:
            raise LlmpruneError(f"{name} has no {name[:-len(MX_SCALES)] + MX_BLOCKS!r}: MXFP4 scales without blocks")
    return out


def _check_fp8(q: Quantized, stored: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], fmt: Format) -> None:
    (dtype, shape), (scale_dtype, scale_shape) = stored[q.values], stored[q.scales]
    if dtype not in FP8_DTYPES or len(shape) < 2 or not scale_dtype.is_floating_point:
        raise LlmpruneError(f"{q.values} is {str(dtype)[6:]} {shape} with {str(scale_dtype)[6:]} scales: "
                            "not an FP8 matrix")
    if fmt.block is None:
        ok = torch.Size(scale_shape).numel() == 1
    else:
        ok = scale_shape == (*shape[:-2], -(-shape[-2] // fmt.block[0]), -(-shape[-1] // fmt.block[1]))
    if not ok:
        raise LlmpruneError(f"{q.scales} has shape {scale_shape}, which does not cover {q.values} {shape} "
                            f"in {fmt.describe()} blocks")


def dequantize(fmt: Format, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weight stored as ``values`` and ``scales``, in ``fmt.dtype``."""
    if fmt.method == MXFP4:
        return dequantize_mxfp4(values, scales, fmt.dtype)
    return dequantize_fp8(values, scales, fmt.block, fmt.dtype)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """``float32(weight) * scale_inv`` in ``dtype``, each scale covering a ``block`` (rows, cols) of
    the (..., out, in) weight, blocks at the right and bottom edges cut short; one scalar scale
    when ``block`` is None. One multiply in float32 then one rounding, as transformers' does.
    Done one row of blocks at a time: the float32 copies stay a block row high."""
    if block is None:
        return (weight.to(torch.float32) * scale_inv.to(torch.float32).reshape(())).to(dtype)
    rows, cols = weight.shape[-2:]
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    scales = scale_inv.to(torch.float32)
    for i in range(scales.shape[-2]):
        band = slice(i * block[0], min((i + 1) * block[0], rows))
        per_column = scales[..., i, :].repeat_interleave(block[1], dim=-1)[..., :cols]  # (..., in)
        out[..., band, :] = (weight[..., band, :].to(torch.float32) * per_column.unsqueeze(-2)).to(dtype)
    return out


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gpt-oss experts from MXFP4 ``blocks`` (E, R, G, 16) and E8M0 ``scales`` (E, R, G): (E, 32 G, R)
    in ``dtype``, the layout gpt-oss keeps in memory (``gate_up_proj`` is (E, hidden, 2 x inner))."""
    # transformers' own unpacking (what from_pretrained runs with Mxfp4Config(dequantize=True)); it
    # needs neither triton nor kernels. Imported here: the module pulls in transformers' loader.
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)
