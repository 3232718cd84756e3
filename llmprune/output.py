"""The output folder as one transaction: refuse an overlapping or non-empty output, write into a
hidden temporary sibling, rename it into place only when complete, and copy the input's small
files (tokenizer, generation config) beside the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from transformers import GenerationConfig, PretrainedConfig

from . import quantized, sparse
from .claims import OutputClaim
from .errors import LlmpruneError
from .shards import ShardWriter, SparseShardWriter

# Files of the input folder that are not copied: weights (rewritten), the card and recipe (new).
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


_REPLACED = {"README.md", "llmprune.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
             "config.json", ".gitattributes"}


def check_output(output: Path, input_folder: Path, overwrite: bool) -> None:
    out, src = output.resolve(), input_folder.resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise LlmpruneError(f"output {output} overlaps the input folder {input_folder}; the input is never modified")
    if out.exists() and not out.is_dir():
        raise LlmpruneError(f"output {output} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LlmpruneError(f"output {output} exists and is not empty (use --overwrite to replace it)")


def make_temp_dir(output: Path) -> Path:
    parent = output.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=parent))
    except OSError as err:
        raise LlmpruneError(f"cannot write output {output}: {err.strerror}") from None


@contextmanager
def temp_output(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden temporary sibling of ``output`` to write into, renamed to ``output`` when the block
    succeeds and removed whatever happens; write failures become one-line errors. The output is
    claimed for the whole block (``OutputClaim``), and a finished output that appeared since the
    run's first check is not replaced without ``overwrite``."""
    try:
        output.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LlmpruneError(f"cannot write output {output}: {err.strerror}") from None
    with OutputClaim(output):
        check_unfinished(output, overwrite)
        tmp = make_temp_dir(output)
        try:
            yield tmp
            replace_folder(tmp, output)
        except OSError as err:
            raise LlmpruneError(f"writing {output} failed: {err.strerror or err}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def check_unfinished(output: Path, overwrite: bool) -> None:
    """Refuse to go on towards a non-empty ``output`` without ``overwrite`` (checked under the claim)."""
    out = output.resolve()
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LlmpruneError(f"output {output} exists and is not empty (use --overwrite to replace it)")


@contextmanager
def closing_on_error(writer: ShardWriter | SparseShardWriter) -> Iterator[None]:
    """Close the writer's files when the block fails (``writer.close`` is the success path)."""
    try:
        yield
    except BaseException:
        writer.abort()
        raise


def replace_folder(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` to ``output``; an old output is removed only after that."""
    out = output.resolve()
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_aux_files(src: Path, dst: Path, model_config: PretrainedConfig, dtype: torch.dtype | None,
                   compressed: list[str] | None = None) -> None:
    """Tokenizer, generation config and other small files; config.json with the output dtype and,
    for a sparse-bitmask output, the format and its ``compressed`` matrices (llmprune.sparse). An
    FP8 or MXFP4 input's quantization_config is left out: its weights were dequantized on read."""
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(_NOT_COPIED) and path.name not in _REPLACED \
                and not path.name.startswith("."):
            shutil.copy2(path, dst / path.name)
    config = quantized.plain_config(sparse.dense_config(json.loads((src / "config.json").read_text())))
    if compressed:
        config.update(sparse.format_config(compressed))
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not (dst / "generation_config.json").exists():
        GenerationConfig.from_model_config(model_config).save_pretrained(dst)


def default_output(model: str, label: str) -> Path:
    """``./<model name>-<label>`` for a folder, a Hub id or a packaged name."""
    return Path(f"{Path(model.rstrip('/')).name.replace('packaged:', '')}-{label}")
