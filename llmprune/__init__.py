"""llmprune: prune Hugging Face language models layer by layer, streamed from disk.

The Python API mirrors the CLI: build a config object, call the function. Each function imports
its workflow when called, because the workflows import transformers, and `import llmprune` alone
(which registers the sparse-bitmask reader below) should stay light.
"""

from .hf import install as _install_sparse_reader
from .version import __version__

__all__ = ["__version__", "evaluate", "finetune", "load", "prune"]


def prune(config, **kwargs):
    """Prune per a :class:`llmprune.config.PruneConfig`; returns the recipe (llmprune.json)."""
    from .pruning import prune as run

    return run(config, **kwargs)


def evaluate(config, **kwargs):
    """Perplexity (and zero-shot tasks) per a :class:`llmprune.config.EvalConfig`; returns an EvalResult."""
    from .perplexity import run

    return run(config, **kwargs)


def finetune(config, **kwargs):
    """Fine-tune a pruned model per a :class:`llmprune.config.FinetuneConfig`, keeping its sparsity exactly;
    returns the recipe (llmprune.json)."""
    from .finetuning import finetune as run

    return run(config, **kwargs)


def load(folder, **kwargs):
    """An ordinary transformers model from an llmprune output, dense or sparse-bitmask; ``kwargs`` go
    to ``from_pretrained`` (``dtype``, ``device_map``, ...)."""
    from .sharing import load as run

    return run(folder, **kwargs)


# Plain AutoModelForCausalLM.from_pretrained reads sparse-bitmask outputs once llmprune is imported.
_install_sparse_reader()
