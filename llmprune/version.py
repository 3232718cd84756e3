"""The package version, apart from llmprune/__init__.py so that any layer may read it."""

from __future__ import annotations

__version__ = "0.1.0"
