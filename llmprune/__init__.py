"""llmprune: prune Hugging Face language models layer by layer, streamed from disk.

The Python API mirrors the CLI: build a config object, call the function.
"""

__version__ = "0.1.0"


def prune(config, **kwargs):
    """Prune per a :class:`llmprune.config.PruneConfig`; returns the recipe (llmprune.json)."""
    from .pipeline import prune as _prune

    return _prune(config, **kwargs)


# `llmprune.evaluate` names both the function below and the module llmprune/evaluate.py. Python
# binds a submodule to its package's attribute when the submodule is first imported, which would
# replace the function with the module whenever anything imported llmprune.evaluate later; importing
# it here first, before the def, keeps `llmprune.evaluate` the function. Modules stay reachable as
# `from llmprune.evaluate import load_windows`.
from . import evaluate as _evaluate_module  # noqa: E402


def evaluate(config, **kwargs):
    """Perplexity (and zero-shot tasks) per a :class:`llmprune.config.EvalConfig`; returns an EvalResult."""
    return _evaluate_module.run(config, **kwargs)


# Same reason as for `evaluate` above: bind the submodule first so that the function keeps the name.
from . import finetune as _finetune_module  # noqa: E402


def finetune(config, **kwargs):
    """Fine-tune a pruned model per a :class:`llmprune.config.FinetuneConfig`, keeping its sparsity exactly;
    returns the recipe (llmprune.json)."""
    return _finetune_module.finetune(config, **kwargs)


def load(folder, **kwargs):
    """An ordinary transformers model from an llmprune output, dense or sparse-bitmask; ``kwargs`` go
    to ``from_pretrained`` (``dtype``, ``device_map``, ...)."""
    from .hub import load as _load

    return _load(folder, **kwargs)


# Plain AutoModelForCausalLM.from_pretrained reads sparse-bitmask outputs once llmprune is imported.
from . import hf as _hf  # noqa: E402

_hf.install()
