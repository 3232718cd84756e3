"""llmprune: prune Hugging Face language models layer by layer, streamed from disk.

The Python API mirrors the CLI: build a config object, call the function.
"""

__version__ = "0.1.0"


def prune(config, **kwargs):
    """Prune per a :class:`llmprune.config.PruneConfig`; returns the recipe (llmprune.json)."""
    from .pipeline import prune as _prune

    return _prune(config, **kwargs)
