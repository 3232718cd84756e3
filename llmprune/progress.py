"""Terminal output: progress bars with ETA, or JSON lines for scripts.

``setup_logging`` configures the root logger once per command: text (``message``) or JSON lines
(one object per record on stderr). ``track`` is the one progress bar every long step uses: a tqdm
bar with ETA in text mode; in JSON mode, ``start`` / ``progress`` / ``done`` events instead, so a
script reads the same steps and ETAs. The mode is read off the root logger's formatter, so deep
code needs no flag threaded through it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger("llmprune.progress")

LOG_FORMATS = ("text", "json")
JSON_PROGRESS_INTERVAL_S = 1.0  # at most one progress event a second per step, plus the last
_QUIET_LIBRARIES = ("transformers", "huggingface_hub", "accelerate", "datasets", "matplotlib", "PIL")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any ``extra={"data": {...}}``."""
    def format(self, record: logging.LogRecord) -> str:
        event = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        event.update(getattr(record, "data", None) or {})
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def setup_logging(quiet: bool = False, log_format: str = "text") -> None:
    """Root logging for a command: INFO (WARNING when quiet), as text or JSON lines on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter("%(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "llmprune", False)]:
        root.removeHandler(old)
    handler.llmprune = True  # ours to replace on the next call (tests run many commands in one process)
    if log_format == "json" or not root.handlers:  # text: like logging.basicConfig, keep a host's handlers
        root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    for name in _QUIET_LIBRARIES:  # their chatter is not for our users
        logging.getLogger(name).setLevel(logging.ERROR)


def table(rows: list[tuple[str, str]]) -> str:
    """Right-aligned keys, then values: the one-screen reports of every command."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:>{width}}  {v}" for k, v in rows)


def json_mode() -> bool:
    """Whether the root logger writes JSON lines (``setup_logging(log_format="json")``)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def emit(data: dict) -> None:
    """One JSON line on stderr whatever the log level: summaries and errors, which scripts always need."""
    print(json.dumps({"time": round(time.time(), 3), **data}, default=str), file=sys.stderr, flush=True)


def event(name: str, message: str = "", **data) -> None:
    """A machine-readable event: a JSON line in JSON mode, ``message`` as plain text otherwise."""
    log.info(message or name, extra={"data": {"event": name, **data}})


def track(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None, enabled: bool = True,
          initial: int = 0):
    """``items`` wrapped to show progress and ETA: a tqdm bar, or JSON events in JSON mode.

    Iterate the result; ``set_postfix(**values)`` adds values to the bar (or the next event).
    Silent when not ``enabled``.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if json_mode():
        return JsonBar(items, desc, unit, total, enabled and log.isEnabledFor(logging.INFO))
    return tqdm(items, desc=desc, unit=unit, total=total, disable=not enabled, initial=initial)


class JsonBar:
    """The JSON-lines counterpart of a tqdm bar: ``start``, throttled ``progress`` with ETA, ``done``."""
    def __init__(self, items: Iterable[T], desc: str, unit: str, total: int | None, enabled: bool):
        self.items, self.desc, self.unit, self.total, self.enabled = items, desc, unit, total, enabled
        self.postfix: dict = {}

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def __iter__(self) -> Iterator[T]:
        if not self.enabled:
            yield from self.items
            return
        common = {"step": self.desc, "unit": self.unit, "total": self.total}
        start = last = time.perf_counter()
        event("start", f"{self.desc}: start", **common)
        done = 0
        for item in self.items:
            yield item
            done += 1
            now = time.perf_counter()
            if now - last >= JSON_PROGRESS_INTERVAL_S or done == self.total:
                last, elapsed = now, now - start
                eta = elapsed / done * (self.total - done) if self.total else None
                event("progress", f"{self.desc}: {done}/{self.total}", **common, done=done, **self.postfix,
                      elapsed_s=round(elapsed, 3), eta_s=None if eta is None else round(eta, 3))
        event("done", f"{self.desc}: done", **common, done=done, seconds=round(time.perf_counter() - start, 3))
