"""Resumable pruning runs: a journal of completed layers in the hidden temporary folder.

A run writes into ``.<output>.partial-<key>`` beside the output, ``key`` a hash of everything
that determines the output bytes (options, input shards, versions). After each decoder layer's
tensors are written and fsync'd, the journal (``.resume/journal.json``, replaced atomically)
records the layer, the SHA-256 of every tensor written so far, the zero counts, and a saved copy
of the calibration activations leaving that layer. Rerunning the same command finds the folder,
checks the last layer's tensors against their hashes, and continues with the next layer; the
shards are reopened in place (their layout is planned, so every offset is known). A structured run
also journals the units each layer removed (and the first pass's scores: block influence for layers,
each dimension's score for hidden), and a run that writes a compressed format the appending
writer's state (each shard's entries and end). Block-wise
fine-tuning (``finetune.run_blockwise``) journals its layers through the same class.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from .claims import OutputClaim
from .errors import LlmpruneError
from .faults import fault_point
from .shards import ShardWriter, SparseShardWriter

log = logging.getLogger(__name__)

STATE = ".resume"  # the journal's folder inside the partial output; removed before the rename
NOT_IN_KEY = ("output", "overwrite", "resume", "max_memory", "stream_from_hub")  # do not change the bytes


def run_key(config: dict, shards: dict, versions: dict) -> str:
    """Hash of what decides the output's bytes: a partial folder is only resumed by the same run."""
    relevant = {k: v for k, v in config.items() if k not in NOT_IN_KEY}
    blob = json.dumps({"config": relevant, "input": shards, "versions": versions}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def partial_folder(output: Path, key: str) -> Path:
    out = output.resolve()
    return out.with_name(f".{out.name}.partial-{key}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@runtime_checkable
class ResumableStep(Protocol):
    """A step with per-layer decisions that a resumed run replays instead of recomputing (the units a
    structured step removed, a block-wise fine-tune's report line); the state is JSON-serialisable."""

    def layer_state(self, index: int) -> object: ...

    def restore_layer_state(self, index: int, state: object) -> None: ...


@runtime_checkable
class AppendingWriter(Protocol):
    """A writer whose files grow as it writes (sparse-bitmask): its end offsets go into the journal."""
    def state(self) -> dict: ...


@dataclass
class BeforeStream:
    """Results computed before the layer stream, kept so that a resumed run need not redo them."""
    eval_dense: dict | None = None  # the input's perplexity on the evaluation windows
    owl: dict | None = None  # OWL: per-matrix "targets" and per-layer "outlier_ratios"
    influence: dict | None = None  # the first pass of --pattern layers (block influence) or hidden (dimension
    # scores): its "scores" and the "calibration" used
    mix: dict | None = None  # a structured mix: the counts and dropped layers chosen, and the search record


@dataclass
class Journal:
    """What an interrupted run completed, kept durable in ``folder/.resume``."""
    folder: Path  # the partial output folder
    key: str
    layers_done: int = 0
    digests: dict[str, str] = field(default_factory=dict)  # tensor name -> sha256 of its written bytes
    zeros: dict[str, int] = field(default_factory=dict)
    states_folder: str | None = None  # folder (in .resume) of the calibration states leaving the last layer
    before: BeforeStream = field(default_factory=BeforeStream)
    steps: dict = field(default_factory=dict)  # str(layer) -> what the step decided there (structured units)
    writer: dict | None = None  # the state of a writer that appends (compressed output) after the last layer
    _lock: int | None = field(default=None, repr=False)
    claim: OutputClaim | None = field(default=None, repr=False)  # the output's, held until ``release``

    @property
    def state_dir(self) -> Path:
        return self.folder / STATE

    def save(self) -> None:
        data = {"key": self.key, "layers_done": self.layers_done, "digests": self.digests, "zeros": self.zeros,
                "states_folder": self.states_folder, "before": asdict(self.before), "steps": self.steps,
                "writer": self.writer}
        _atomic_write(self.state_dir / "journal.json", json.dumps(data))

    def remember(self, **results) -> None:
        """Keep results computed before the stream (fields of ``BeforeStream``) durably."""
        self.before = replace(self.before, **results)
        self.save()

    def lock(self) -> None:
        self._lock = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = None
            raise LlmpruneError(f"another llmprune run is writing {self.folder}") from None

    def finish(self) -> None:
        """Drop the journal before the folder becomes the output (the output's claim stays held)."""
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def release(self) -> None:
        """Let go of the output once the run has finished or failed (killed, the kernel does it)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def verify(self, writer: ShardWriter | SparseShardWriter, layer_names: list[str]) -> None:
        """The last completed layer's tensors must still be what the journal recorded."""
        for name in layer_names:
            if writer.digest(name) != self.digests.get(name):
                raise LlmpruneError(f"the interrupted run in {self.folder} is damaged ({name} differs from its "
                                    "journal): remove that folder to start again")

    def restore(self, step) -> None:
        """Give a resumed run's step what it decided in the completed layers."""
        step.zeros.update(self.zeros)
        if isinstance(step, ResumableStep):
            for index, state in self.steps.items():
                step.restore_layer_state(int(index), state)

    def on_layer(self, writer: ShardWriter | SparseShardWriter, names: list[list[str]], outside: list[str], step, states,
                 written: list[list[str]] | None = None) -> Callable:
        """The engine hook: after layer i is written, flush, hash, save activations, commit.

        ``names``: each layer's input tensors (the step's zero counts are keyed by them);
        ``written``: the output tensors each layer writes, when a structured step renames or drops them.
        """
        written = names if written is None else written

        def capture(index: int) -> Callable[[], None]:
            snapshot = states.snapshot() if states is not None else None
            # the tensors outside the layers (pruned with --prune-vision) are committed with layer 0
            counted = names[index] + (outside if index == 0 else [])
            zeros = {n: step.zeros[n] for n in counted if n in step.zeros}
            state = step.layer_state(index) if isinstance(step, ResumableStep) else None

            def commit() -> None:
                fault_point(f"layer-{index}-written")
                writer.flush()
                done = written[index] + (outside if index == 0 else [])
                self.digests.update({n: writer.digest(n) for n in done})
                self.zeros.update(zeros)
                if state is not None:
                    self.steps[str(index)] = state
                if isinstance(writer, AppendingWriter):
                    self.writer = copy.deepcopy(writer.state())
                old, self.states_folder = self.states_folder, None
                if snapshot is not None:
                    self.states_folder = f"states-{index}"
                    # a run killed while saving them left a partial copy that no journal names
                    shutil.rmtree(self.state_dir / self.states_folder, ignore_errors=True)
                    states.save(snapshot, self.state_dir / self.states_folder)
                    fault_point(f"layer-{index}-states-saved")
                    _fsync_dir(self.state_dir)
                self.layers_done = index + 1
                self.save()
                if old:
                    shutil.rmtree(self.state_dir / old, ignore_errors=True)
                fault_point(f"layer-{index}-committed")

            return commit

        return capture


def open_partial(output: Path, key: str, require: bool, overwrite: bool | None = None) -> Journal:
    """The journal of an interrupted run of the same options, or a fresh one in a new folder.

    The output is claimed first (``claims.OutputClaim``): a second run writing it is refused while
    this one lives. With ``overwrite`` False a finished output found under the claim is refused too
    (it may have appeared since the caller's first check). The claim goes with ``Journal.release``.
    """
    try:
        output.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LlmpruneError(f"cannot write output {output}: {err.strerror}") from None
    claim = OutputClaim(output)
    try:
        if overwrite is False:
            out = output.resolve()
            if out.is_dir() and any(out.iterdir()):
                raise LlmpruneError(f"output {output} exists and is not empty (use --overwrite to replace it)")
        journal = _open_partial(output, key, require)
    except BaseException:
        claim.release()
        raise
    journal.claim = claim
    return journal


def _open_partial(output: Path, key: str, require: bool) -> Journal:
    folder = partial_folder(output, key)
    others = [p for p in output.resolve().parent.glob(f".{output.resolve().name}.partial-*")
              if p != folder and (p / STATE / "journal.json").is_file()]
    path = folder / STATE / "journal.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        if data is not None and data.get("key") == key:
            journal = Journal(folder, key, data["layers_done"], data["digests"], data["zeros"],
                              data["states_folder"], BeforeStream(**data["before"]), data.get("steps", {}),
                              data.get("writer"))
            journal.lock()
            log.info("resuming the interrupted run in %s after %d completed layers", folder, journal.layers_done)
            return journal
    if require:
        hint = f"; partial runs of other options: {', '.join(p.name for p in others)}" if others else ""
        raise LlmpruneError(f"--resume: no interrupted run of these options beside {output} "
                            f"(expected {folder.name}){hint}; rerun without --resume to start afresh")
    for other in others:
        log.warning("%s holds an interrupted run with other options; remove it to free its disk space", other)
    if folder.exists():  # killed before its first journal entry: nothing to keep
        shutil.rmtree(folder)
    try:
        (folder / STATE).mkdir(parents=True)
    except OSError as err:
        raise LlmpruneError(f"cannot write output {output}: {err.strerror}") from None
    journal = Journal(folder, key)
    journal.lock()
    journal.save()
    return journal
