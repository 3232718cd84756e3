"""Claims on output paths: one run at a time writes an output.

A run claims its output before it first checks it and keeps the claim until its folder is renamed
into place, so two runs (with the same or other options) never both finish into one output, and a
finished output is never replaced by a run that checked it before it existed.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import LlmpruneError


class OutputClaim:
    """An exclusive claim on an output path, held by a run from its start to the rename into place: a
    second run writing the same output (with any options) is refused while the first holds it.

    The claim is a ``flock`` on ``.<name>.lock`` beside the output; the kernel drops it when the process
    dies, so a killed run never blocks the next. The file is removed on release.
    """

    def __init__(self, output: Path):
        """Claim ``output`` (its parent folder must exist), or raise LlmpruneError naming it."""
        out = output.resolve()
        self.path = out.with_name(f".{out.name}.lock")
        self._file = None
        while self._file is None:
            try:
                file = open(self.path, "a+")
            except OSError as err:
                raise LlmpruneError(f"cannot write output {output}: {err.strerror or err}") from None
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                raise LlmpruneError(f"another llmprune run is writing {output}: wait for it to finish or choose "
                                    "another output") from None
            # the holder before us may have removed the file between our open and our lock: retry on a new one
            try:
                same = os.path.samestat(os.fstat(file.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._file = file
            else:
                file.close()

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a holder that never released: drop the claim with the object
        self.release()
