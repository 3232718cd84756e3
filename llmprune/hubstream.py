"""--stream-from-hub: read a Hub model's shards one at a time, deleting each once it is consumed.

Only the small files (config, tokenizer, index) are downloaded up front. Each shard's safetensors
header is fetched with two ranged requests, so the whole output can be planned before any weights
arrive; a shard is downloaded with ``hf_hub_download`` when its first tensor is read, and deleted
as soon as every one of its tensors has been read. A small tensor (at most a quarter of its
shard) whose shard is not on disk is fetched alone by a ranged request instead: the embeddings,
final norm and head, read first, never pin the shards they share with the first or last layers.
The engine reads layer by layer (the next layer ahead), so at most the shards of two consecutive
layers are on disk at once, beside the output being written.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from .checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, Shard
from .errors import LlmpruneError

log = logging.getLogger(__name__)


def _ranged(url: str, start: int, end: int) -> bytes:
    from huggingface_hub.utils import build_hf_headers, get_session

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end}"}
    response = get_session().get(url, headers=headers, follow_redirects=True)
    if response.status_code not in (200, 206):
        raise LlmpruneError(f"cannot read {url}: HTTP {response.status_code}")
    data = response.content
    return data[start:end + 1] if response.status_code == 200 else data  # 200: the server sent it all


class RemoteShard(Shard):
    """A shard on the Hub: header fetched by range requests, data downloaded on first read."""
    def __init__(self, repo: str, commit: str, filename: str, workdir: Path):
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        self.repo, self.commit, self.filename, self.workdir = repo, commit, filename, workdir
        self.url = url = hf_hub_url(repo, filename, revision=commit)
        size = get_hf_file_metadata(url).size
        length = int.from_bytes(_ranged(url, 0, 7), "little")
        self.unread: set[str] = set()
        self.lock = threading.Lock()
        self.downloads = 0
        super().__init__(workdir / filename, header=(_ranged(url, 8, 7 + length) if 0 < length < size else b"", size))
        self.unread = set(self.entries)

    def read(self, name: str) -> torch.Tensor:
        from huggingface_hub import hf_hub_download

        with self.lock:
            spec, start, end = self.entries[name]
            if not self.path.is_file() and 4 * (end - start) <= self.size:
                data = _ranged(self.url, self.data_start + start, self.data_start + end - 1) if end > start else b""
                if len(data) != end - start:
                    raise LlmpruneError(f"short read of {name!r} from {self.filename}: {len(data)} of {end - start} bytes")
                self.unread.discard(name)
                return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(spec.dtype).reshape(spec.shape) \
                    if data else torch.empty(spec.shape, dtype=spec.dtype)
            if not self.path.is_file():
                log.info("downloading %s", self.filename)
                hf_hub_download(self.repo, self.filename, revision=self.commit, local_dir=self.workdir)
                self.downloads += 1
            tensor = super().read(name)
            self.unread.discard(name)
            if not self.unread:  # consumed: free its disk space now
                self.close()
                self.path.unlink(missing_ok=True)
                self.unread = set(self.entries)  # a later read (rare) downloads it again
        return tensor


class HubCheckpoint(Checkpoint):
    """The safetensors weights of a Hub repo, streamed shard by shard into a private folder."""
    def __init__(self, folder: Path, repo: str, commit: str):
        self.folder = folder
        self.workdir = Path(tempfile.mkdtemp(prefix="llmprune-shards-"))
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            weight_map, files = None, [SINGLE_NAME]
        self.shards = {f: RemoteShard(repo, commit, f, self.workdir) for f in files}
        self.location = self._locate(weight_map)
        self._name_tensors()

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.workdir, ignore_errors=True)
