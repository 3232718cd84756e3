"""`python -m llmprune.cli ARGS`: the same as the `llmprune` command."""

import sys

from . import main

sys.exit(main())
