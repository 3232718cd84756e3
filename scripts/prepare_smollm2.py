#!/usr/bin/env python
"""Convert the packaged SmolLM2-135M-Instruct GGUF into a Hugging Face checkpoint and print its folder.

Tests, the demo and the benchmarks all read the same cache folder, so running this once up
front keeps the one-time conversion out of their timings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Runnable from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmprune import packaged  # noqa: E402
from llmprune.errors import LlmpruneError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", metavar="DIR", help="cache folder (default: $LLMPRUNE_CACHE or ~/.cache/llmprune)")
    parser.add_argument(
        "--dtype", default="float32", help="checkpoint dtype (default: float32, exact for the Q4_1 weights)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cache:
        os.environ["LLMPRUNE_CACHE"] = args.cache
    try:
        folder = packaged.smollm2_checkpoint(args.dtype)
    except LlmpruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
