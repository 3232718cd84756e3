"""Resolve a model id or folder; read tensors one at a time; write shards as tensors arrive.

Safetensors files are parsed here directly (an 8-byte header length, a JSON header, then the raw
bytes) so that a tensor is read with one positional read into its own buffer and written with
one positional write at an offset planned in advance. Nothing is memory-mapped: mapped pages
count towards the process's resident memory, and streaming a 140 GB checkpoint must not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import quantized, sparse
from .errors import LlmpruneError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def resolve(model: str, revision: str | None = None, weights: bool = True) -> tuple[Path, dict]:
    """A local folder for ``model`` (a folder, or a Hub id fetched through the local cache).

    Returns the folder and a description of the source for the recipe (id, revision, commit).
    ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and the cache are honoured by huggingface_hub itself.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), {"model": model, "path": str(path.resolve())}
    if path.exists():
        raise LlmpruneError(f"{model} is a file, not a model folder")
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise LlmpruneError(f"model folder {model} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*", "README.md"] + (["*.safetensors"] if weights else [])
    try:
        folder = snapshot_download(model, revision=revision, allow_patterns=patterns)
    except RepositoryNotFoundError:
        raise LlmpruneError(f"model {model!r} not found: no such folder, and no such repo on the Hub") from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        why = ("offline mode (HF_HUB_OFFLINE=1) forbids downloading it" if constants.HF_HUB_OFFLINE
               else "the Hub is unreachable")
        raise LlmpruneError(f"model {model!r} is neither a local folder nor in the Hugging Face cache, and {why}") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LlmpruneError(f"cannot fetch {model!r} from the Hub: {reason}") from None
    folder = Path(folder)
    return folder, {"model": model, "revision": revision or "main", "commit": folder.name, "path": str(folder)}


class Shard:
    """One safetensors file: its header, and positional reads of its tensors."""
    def __init__(self, path: Path, header: tuple[bytes, int] | None = None):
        """``header``: the JSON header and file size when they were fetched without the file."""
        self.path = path
        try:
            if header is None:
                self.size = path.stat().st_size
                with open(path, "rb") as f:
                    head = f.read(8)
                    if len(head) < 8:
                        raise ValueError("file shorter than a header")
                    n = int.from_bytes(head, "little")
                    if not 0 < n <= min(_MAX_HEADER, self.size - 8):
                        raise ValueError("header length out of range")
                    self.header_bytes = f.read(n)
            else:
                self.header_bytes, self.size = header
                n = len(self.header_bytes)
                if not 0 < n <= _MAX_HEADER:
                    raise ValueError("header length out of range")
            header = json.loads(self.header_bytes)
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise LlmpruneError(f"corrupt safetensors file {path.name}: {err}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[TensorSpec, int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                spec = TensorSpec(name, dtype, tuple(int(d) for d in info["shape"]))
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise LlmpruneError(f"corrupt safetensors file {path.name}: bad entry for {name!r}") from None
            if end - start != spec.nbytes or self.data_start + end > self.size:
                raise LlmpruneError(
                    f"corrupt or truncated safetensors file {path.name}: {name!r} lies outside the file"
                )
            self.entries[name] = (spec, start, end)
        self._fd: int | None = None

    def read(self, name: str) -> torch.Tensor:
        spec, start, end = self.entries[name]
        buf = torch.empty(end - start, dtype=torch.uint8)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], self.data_start + start + done)
            if got <= 0:
                raise LlmpruneError(f"truncated safetensors file {self.path.name} while reading {name!r}")
            done += got
        return buf.view(spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Checkpoint:
    """The safetensors weights of a Hugging Face folder, single-file or sharded with an index."""
    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise LlmpruneError(f"corrupt {INDEX_NAME} in {folder}") from None
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            found = sorted(p.name for p in folder.glob("*.safetensors"))
            if len(found) == 1:
                weight_map, files = None, found
            elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
                raise LlmpruneError(
                    f"{folder} holds only PyTorch pickle weights (.bin); convert them to safetensors first, e.g. "
                    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)"
                )
            else:
                raise LlmpruneError(f"no safetensors weights in {folder}")
        self.shards: dict[str, Shard] = {}
        for name in files:
            if not (folder / name).is_file():
                raise LlmpruneError(f"{INDEX_NAME} names {name}, which is missing from {folder}")
            self.shards[name] = Shard(folder / name)
        self.location = self._locate(weight_map)  # stored tensor name -> its shard
        self._name_tensors()

    def _name_tensors(self) -> None:
        """The names the model sees over the located tensors: compressed matrices under their dense
        names, quantized weights under their plain names (their scales hidden)."""
        self.compressed = self._compressed_specs(sparse.folder_compressed_names(self.folder))
        self.quantization = quantized.folder_format(self.folder)
        self.quantized = {} if self.quantization is None else quantized.plan(
            self.quantization, {n: (s.entries[n][0].dtype, s.entries[n][0].shape) for n, s in self.location.items()})
        self._names = self._logical_names()
        self._name_set = set(self._names)

    @property
    def dequantized(self) -> str | None:
        """What reading dequantizes, e.g. "input FP8 (block 128x128) dequantized to bfloat16"; None
        when nothing is quantized."""
        return self.quantization.summary if self.quantized else None

    def _locate(self, weight_map: dict[str, str] | None) -> dict[str, Shard]:
        """Tensor name -> shard, in the index's order (which the output's layout follows)."""
        location: dict[str, Shard] = {}
        if weight_map is None:
            for shard in self.shards.values():
                location.update({n: shard for n in shard.entries})
        else:
            for tensor, file in weight_map.items():
                shard = self.shards[file]
                if tensor not in shard.entries:
                    raise LlmpruneError(f"{INDEX_NAME} names tensor {tensor!r}, which {file} does not contain")
                location[tensor] = shard
        return location

    def _compressed_specs(self, names: list[str]) -> dict[str, TensorSpec]:
        """Dense specs of the matrices stored in llmprune's sparse format (see llmprune.sparse)."""
        specs = {}
        for name in names:
            parts = sparse.part_names(name)
            missing = [p for p in parts.values() if p not in self.location]
            if missing:
                raise LlmpruneError(f"config.json names compressed matrix {name!r}, but {missing[0]!r} "
                                    f"is missing from {self.folder}")
            shape = self.location[parts["shape"]].read(parts["shape"])
            if shape.dtype != torch.int64 or tuple(shape.shape) != (2,):
                raise LlmpruneError(f"corrupt sparse checkpoint: {parts['shape']} is not two int64 values")
            dtype = self.location[parts["values"]].entries[parts["values"]][0].dtype
            specs[name] = TensorSpec(name, dtype, tuple(int(d) for d in shape))
        return specs

    def _logical_names(self) -> list[str]:
        """Tensor names as the model sees them: each compressed matrix or quantized weight once, in
        place of its parts (where its bitmask, or its quantized values, are stored)."""
        parts = {stored: name for name in self.compressed for stored in sparse.part_names(name).values()}
        parts.update({stored: q.name for q in self.quantized.values() for stored in (q.values, q.scales)})
        first = {sparse.part_names(name)["bitmask"] for name in self.compressed}
        first.update(q.values for q in self.quantized.values())
        return [parts.get(stored, stored) for stored in self.location if stored not in parts or stored in first]

    @property
    def names(self) -> list[str]:
        """Every tensor, compressed matrices under their dense names."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._name_set

    def spec(self, name: str) -> TensorSpec:
        if name in self.compressed:
            return self.compressed[name]
        if name in self.quantized:
            return TensorSpec(name, self.quantization.dtype, self.quantized[name].shape)
        return self.location[name].entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``; a compressed matrix comes back dense, bit-identical to what was saved,
        a quantized weight dequantized to the compute dtype."""
        if name in self.compressed:
            parts = {part: self.location[stored].read(stored) for part, stored in sparse.part_names(name).items()}
            return sparse.decompress(parts, name)
        if name in self.quantized:
            q = self.quantized[name]
            return quantized.dequantize(self.quantization, self.location[q.values].read(q.values),
                                        self.location[q.scales].read(q.scales))
        return self.location[name].read(name)

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.shards.values())

    def fingerprint(self) -> dict[str, dict]:
        """Size and header hash of each shard: identifies the layout cheaply, without rehashing data."""
        return {
            name: {"bytes": s.size, "header_sha256": hashlib.sha256(s.header_bytes).hexdigest()}
            for name, s in self.shards.items()
        }

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()


