"""Fault injection for the kill-and-resume tests: a labelled point where the process can be made
to die as a power cut would.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)
def fault_point(label: str, kill: bool = True) -> bool:
    """Testing hook: with LLMPRUNE_FAULT_AT=label the process is SIGKILLed here (no cleanup runs), or
    with LLMPRUNE_FAULT_ACTION=stop also set, stopped (SIGSTOP) until a SIGCONT: a live run held
    mid-way, for tests of what a second run sees.

    ``kill=False`` only asks whether the fault is armed at ``label``.
    """
    armed = os.environ.get("LLMPRUNE_FAULT_AT") == label
    if armed and kill:
        stop = os.environ.get("LLMPRUNE_FAULT_ACTION") == "stop"
        log.warning("fault injected at %s: %s the process", label, "stopping" if stop else "killing")
        os.kill(os.getpid(), signal.SIGSTOP if stop else signal.SIGKILL)
    return armed
