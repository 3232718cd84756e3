"""Command line: argument parsing -> config -> library call. No logic of its own."""

from __future__ import annotations

import logging
import os
import sys

from ..errors import LlmpruneError
from ..progress import emit, json_mode
from .commands import run_eval, run_finetune, run_prune
from .study import run_decompress, run_inspect, run_push, run_sensitivity, run_sweep

log = logging.getLogger("llmprune")


COMMANDS = {"prune": run_prune, "eval": run_eval, "finetune": run_finetune, "push": run_push,
            "decompress": run_decompress, "inspect": run_inspect, "sweep": run_sweep, "sensitivity": run_sensitivity}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        if command is not None:
            return command(argv[1:])
        return run_prune(argv)
    except LlmpruneError as err:
        error_line(f"llmprune: error: {err}", "error", str(err))
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure is still one line unless debugging
        if os.environ.get("LLMPRUNE_DEBUG"):
            raise
        error_line(f"llmprune: internal error: {type(err).__name__}: {err} (set LLMPRUNE_DEBUG=1 for a traceback)",
                   "internal_error", f"{type(err).__name__}: {err}")
        return 1


def error_line(text: str, kind: str, message: str) -> None:
    """The one line a failure prints on stderr: text, or a JSON object in JSON mode."""
    if json_mode():
        emit({"event": kind, "level": "error", "message": message})
    else:
        print(text, file=sys.stderr)

