"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class LlmpruneError(Exception):
    """Bad input or an impossible request; the message is shown to the user as is."""


def one_line(err: BaseException) -> str:
    """An exception from a library as one short line: its type and message, whitespace folded."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 200 else text[:197] + "..."
