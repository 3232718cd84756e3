"""Writing safetensors shards whose layout is planned before any data arrives: dense shards filled
tensor by tensor at planned offsets, and sparse-bitmask shards appended as matrices are compressed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import sparse
from .checkpoint import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME, TensorSpec
from .devices import parse_size
from .errors import LlmpruneError
from .faults import fault_point


class ShardWriter:
    """Writes tensors into shards whose layout is planned up front from their specs.

    Every tensor's offset is known before any data arrives, so tensors are written one at a time
    in any order and memory stays O(one tensor). ``close`` checks that every planned tensor came
    and writes the index. With ``resume`` the shards of an interrupted run with the same plan are
    reopened as they are (their headers must match the plan) instead of being created afresh.
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int, resume: bool = False):
        self.folder = folder
        groups = _group(specs, [spec.nbytes for spec in specs], max_shard_bytes)
        self.files = _shard_files(len(groups))
        self.place: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (fd index, offset, spec)
        self.fds: list[int] = []
        self.pending = {spec.name for spec in specs}
        self.total_bytes = sum(spec.nbytes for spec in specs)
        heads = [self._plan(i, group) for i, group in enumerate(groups)]
        check_free_space(folder, [(folder / f, len(h) + sum(s.nbytes for s in g)) for f, h, g in
                                  zip(self.files, heads, groups)])
        for file, head, group in zip(self.files, heads, groups):
            self.fds.append(self._open(folder / file, head, len(head) + sum(s.nbytes for s in group), resume))

    def _plan(self, i: int, group: list[TensorSpec]) -> bytes:
        """Shard ``i``'s 8-byte length and JSON header; records where each tensor's data goes."""
        header, offset = {}, 0
        for spec in group:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        for spec in group:
            self.place[spec.name] = (i, 8 + len(raw) + header[spec.name]["data_offsets"][0], spec)
        return len(raw).to_bytes(8, "little") + raw

    @staticmethod
    def _open(path: Path, head: bytes, size: int, resume: bool) -> int:
        if resume:
            fd = os.open(path, os.O_RDWR)
            if os.fstat(fd).st_size != size or os.pread(fd, len(head), 0) != head:
                os.close(fd)
                raise LlmpruneError(f"{path} does not match the planned output: cannot resume into it")
            return fd
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_all(fd, head, 0)
        os.ftruncate(fd, size)
        return fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, offset, spec = self.place[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {spec.dtype} {spec.shape}")
        _write_tensor(self.fds[index], name, tensor, offset)
        self.pending.discard(name)

    def digest(self, name: str) -> str:
        """SHA-256 of a tensor's bytes as they are in its shard now."""
        index, offset, spec = self.place[name]
        return _digest(self.fds[index], offset, spec.nbytes)

    def mark_written(self, names) -> None:
        """Tensors an interrupted run already wrote (and a journal vouches for)."""
        self.pending.difference_update(names)

    def flush(self) -> None:
        """Make everything written so far durable."""
        for fd in self.fds:
            os.fsync(fd)

    def close(self) -> None:
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} planned tensors never written, e.g. {sorted(self.pending)[0]}")
        self.flush()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        _write_index(self.folder, self.files, {name: i for name, (i, _, _) in self.place.items()}, self.total_bytes)

    def abort(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _group(items: list, sizes: list[int], max_bytes: int) -> list[list]:
    """Consecutive ``items`` cut into shards of at most ``max_bytes`` (a larger item stands alone)."""
    groups: list[list] = [[]]
    size = 0
    for item, nbytes in zip(items, sizes):
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    return groups


def _shard_files(total: int) -> list[str]:
    return [SINGLE_NAME] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]


def _write_index(folder: Path, files: list[str], shard_of: dict[str, int], total_bytes: int) -> None:
    """``model.safetensors.index.json`` for a sharded checkpoint (none for a single file)."""
    if len(files) > 1:
        weight_map = {name: files[i] for name, i in shard_of.items()}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


@dataclass(frozen=True)
class Planned:
    """A tensor whose size is known only when it arrives: its name, dtype, rank and estimated bytes."""
    name: str
    dtype: torch.dtype
    ndim: int
    estimate: int


_WIDEST = 10**19  # as many digits as any int64 shape or offset


class AppendShardWriter:
    """Writes tensors whose sizes are known only on arrival, such as compressed matrices.

    Shards are cut from estimated sizes. Each shard reserves room for its header with every shape
    and offset at its widest; tensors are appended as they come, and ``close`` writes the real
    header into that room padded with spaces, which the safetensors format allows. Memory stays
    O(one tensor) and each byte is written once.

    ``state()`` is what an interrupted run needs to continue (each shard's entries and end); with
    ``resume`` set to it the shards are reopened, and whatever was appended after that state is
    overwritten and cut off at ``close``.
    """

    def __init__(self, folder: Path, planned: list[Planned], max_shard_bytes: int, resume: dict | None = None):
        self.folder = folder
        groups = _group(planned, [p.estimate for p in planned], max_shard_bytes)
        self.files = _shard_files(len(groups))
        self.shard_of = {p.name: i for i, group in enumerate(groups) for p in group}
        self.planned = {p.name: p for p in planned}
        self.entries: list[dict[str, dict]] = [{} for _ in groups]
        self.reserved: list[int] = []
        self.cursor: list[int] = []
        self.fds: list[int] = []
        for i, (file, group) in enumerate(zip(self.files, groups)):
            widest = {p.name: {"dtype": DTYPE_NAMES[p.dtype], "shape": [_WIDEST] * p.ndim,
                               "data_offsets": [_WIDEST, _WIDEST]} for p in group}
            raw = _header_bytes(widest)
            self.reserved.append(len(raw) + (-len(raw) % 8))  # data starts 8-byte aligned
            self.cursor.append(0)
        if resume is not None:
            if len(resume.get("cursor", ())) != len(groups):
                raise LlmpruneError(f"{folder} does not match the planned output: cannot resume into it")
            self.entries, self.cursor = [dict(e) for e in resume["entries"]], list(resume["cursor"])
        for i, file in enumerate(self.files):
            path = folder / file
            if resume is None:
                self.fds.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                raise LlmpruneError(f"{path} is missing: cannot resume into it") from None
            self.fds.append(fd)
            if self.cursor[i] and os.fstat(fd).st_size < 8 + self.reserved[i] + self.cursor[i]:
                raise LlmpruneError(f"{path} is shorter than its journal says: cannot resume into it")

    def state(self) -> dict:
        return {"entries": self.entries, "cursor": self.cursor}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        plan, i = self.planned[name], self.shard_of[name]
        if tensor.dtype != plan.dtype or tensor.dim() != plan.ndim or name in self.entries[i]:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {plan}")
        start = self.cursor[i]
        size = _write_tensor(self.fds[i], name, tensor, 8 + self.reserved[i] + start)
        self.cursor[i] = start + size
        self.entries[i][name] = {"dtype": DTYPE_NAMES[plan.dtype], "shape": list(tensor.shape),
                                 "data_offsets": [start, start + size]}

    def digest(self, name: str) -> str:
        """SHA-256 of a written tensor's bytes as they are in its shard now."""
        i = self.shard_of[name]
        begin, end = self.entries[i][name]["data_offsets"]
        return _digest(self.fds[i], 8 + self.reserved[i] + begin, end - begin)

    def flush(self) -> None:
        for fd in self.fds:
            os.fsync(fd)

    def close(self) -> None:
        written = sum(len(e) for e in self.entries)
        if written != len(self.planned):
            missing = sorted(set(self.planned) - {n for e in self.entries for n in e})
            raise RuntimeError(f"{len(missing)} planned tensors never written, e.g. {missing[0]}")
        for fd, entries, reserved, cursor in zip(self.fds, self.entries, self.reserved, self.cursor):
            raw = _header_bytes(entries).ljust(reserved)  # never longer than the widest header
            _write_all(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, 8 + reserved + cursor)  # a resumed run may have left bytes past the end
            os.fsync(fd)
            os.close(fd)
        self.fds = []
        _write_index(self.folder, self.files, self.shard_of, sum(self.cursor))

    def abort(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _write_tensor(fd: int, name: str, tensor: torch.Tensor, offset: int) -> int:
    """Write ``tensor``'s bytes at ``offset``; returns their count. The testing hook
    ``tensor:<name>`` kills the process with half of them written."""
    data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    if fault_point(f"tensor:{name}", kill=False):
        _write_all(fd, data[: len(data) // 2], offset)
        fault_point(f"tensor:{name}")
    _write_all(fd, data, offset)
    return len(data)


def _digest(fd: int, offset: int, size: int) -> str:
    """SHA-256 of ``size`` bytes of ``fd`` from ``offset`` (fewer if the file ends first)."""
    h, done = hashlib.sha256(), 0
    while done < size:
        chunk = os.pread(fd, min(1 << 24, size - done), offset + done)
        if not chunk:
            break
        h.update(chunk)
        done += len(chunk)
    return h.hexdigest()


def _header_bytes(entries: dict[str, dict]) -> bytes:
    return json.dumps({**entries, "__metadata__": {"format": "pt"}}, separators=(",", ":")).encode()


class SparseShardWriter:
    """A ShardWriter for llmprune's sparse-bitmask format: the matrices in ``compress`` are written
    as their bitmask, values and shape (see llmprune.sparse), every other tensor as is.

    ``compress`` maps each matrix to its expected sparsity, which only sizes the shards.
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], compress: dict[str, float], max_shard_bytes: int,
                 resume: dict | None = None):
        planned = []
        for spec in specs:
            if spec.name not in compress:
                planned.append(Planned(spec.name, spec.dtype, len(spec.shape), spec.nbytes))
                continue
            if len(spec.shape) != 2:
                raise ValueError(f"{spec.name}: only matrices are compressed, got shape {spec.shape}")
            names = sparse.part_names(spec.name)
            rows, cols = spec.shape
            kept = rows * cols - round(compress[spec.name] * rows * cols)
            planned += [Planned(names["bitmask"], torch.uint8, 2, rows * -(-cols // 8)),
                        Planned(names["values"], spec.dtype, 1, kept * spec.dtype.itemsize),
                        Planned(names["shape"], torch.int64, 1, 16)]
        self.compress = set(compress)
        self.out = AppendShardWriter(folder, planned, max_shard_bytes, resume)
        self.files = self.out.files

    def state(self) -> dict:
        return self.out.state()

    def digest(self, name: str) -> str:
        """SHA-256 of a tensor as stored: of its parts' digests when it is compressed."""
        if name not in self.compress:
            return self.out.digest(name)
        return hashlib.sha256("".join(self.out.digest(p) for p in sparse.part_names(name).values()).encode()).hexdigest()

    def mark_written(self, names) -> None:
        """Nothing to do: the resumed state lists what was written."""

    def flush(self) -> None:
        self.out.flush()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.compress:
            self.out.write(name, tensor)
            return
        parts = sparse.compress(tensor)
        for part, stored in sparse.part_names(name).items():
            self.out.write(stored, parts[part])

    def close(self) -> None:
        self.out.close()

    def abort(self) -> None:
        self.out.abort()


DISK_MARGIN = 16 * 2**20  # room for the index, config, tokenizer and model card


def check_free_space(folder: Path, files: list[tuple[Path, int]]) -> None:
    """Refuse before writing when ``files`` (path, final size) cannot fit on ``folder``'s disk.

    Space an interrupted run's files already hold counts as available to them.
    """
    held = sum(p.stat().st_blocks * 512 for p, _ in files if p.is_file())
    need = sum(size for _, size in files) + DISK_MARGIN - held
    free = shutil.disk_usage(folder).free
    if need > free:
        raise LlmpruneError(f"not enough free disk space in {folder.parent}: the output needs {need / 1e9:.3f} GB "
                            f"more, {free / 1e9:.3f} GB free")


def _write_all(fd: int, data, offset: int) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def make_writer(folder: Path, specs: list[TensorSpec], compressed: dict[str, float], max_shard_size: str,
                resume: dict | None = None) -> ShardWriter | SparseShardWriter:
    """A dense writer, or a sparse-bitmask one when there are ``compressed`` matrices (name -> sparsity).

    ``resume``: the journalled writer state of an interrupted run ({} for a dense writer).
    """
    if compressed:
        return SparseShardWriter(folder, specs, compressed, parse_size(max_shard_size), resume)
    return ShardWriter(folder, specs, parse_size(max_shard_size), resume=resume is not None)
