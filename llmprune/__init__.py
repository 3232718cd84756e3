"""llmprune: prune Hugging Face language models layer by layer, streamed from disk.

The Python API mirrors the CLI: each function takes the model and the command's options under the
same names (``--calib-data`` is ``calib_data=``), or one config object (``llmprune.config``)::

    import llmprune
    recipe = llmprune.prune("./my-model", sparsity=0.5, method="wanda", output="my-model-wanda-50")
    result = llmprune.evaluate("my-model-wanda-50", data="sotu", max_windows=8)

Errors are ``llmprune.errors.LlmpruneError`` with one-line messages that name the options as passed
here. Each function imports its workflow when called, because the workflows import transformers,
and ``import llmprune`` alone (which registers the sparse-bitmask reader below) should stay light.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from contextlib import contextmanager
from typing import Iterator

from .config import FINETUNE_TRAINING, EvalConfig, FinetuneConfig, Options, PruneConfig
from .errors import LlmpruneError
from .hf import install as _install_sparse_reader
from .version import __version__

__all__ = ["__version__", "evaluate", "finetune", "load", "prune", "LlmpruneError"]


def prune(model: str | PruneConfig, /, *, progress: bool = True, **options) -> dict:
    """Prune ``model`` (a folder, Hub id or ``packaged:smollm2``) with the prune command's options as
    keywords (``sparsity``, ``method``, ``pattern``, ``output``, ``calib_data``, ``finetune_steps``, ...),
    or per a :class:`llmprune.config.PruneConfig`. Writes the output folder and returns its recipe
    (llmprune.json, with ``"output"``); the recipe's ``command`` is the equivalent ``llmprune`` command."""
    from .pruning import prune as run

    # internal callers (sweep) pass the command and calibration windows with a config
    extra = {k: options.pop(k) for k in ("command", "calib_ids") if k in options and isinstance(model, PruneConfig)}
    with _named_as_keywords():
        cfg = model if isinstance(model, PruneConfig) else _prune_config(model, options)
        _no_options(model, options, "prune")
        command = extra.pop("command", None) or shlex.join(["llmprune", *cfg.cli_args()])
        return run(cfg, command=command, progress=progress, **extra)


def evaluate(model: str | EvalConfig, /, *, progress: bool = True, **options):
    """Perplexity (and zero-shot ``tasks``) of ``model`` with the eval command's options as keywords
    (``data``, ``seqlen``, ``max_windows``, ``batch_size``, ``device``, ``dtype``, ``stream``, ``json``,
    ``tokenizer``, ...), or per a :class:`llmprune.config.EvalConfig`; returns an ``EvalResult``."""
    from .perplexity import run

    with _named_as_keywords():
        if isinstance(model, EvalConfig):
            cfg = model
        else:
            if "json" in options:  # the command's --json
                options["json_path"] = options.pop("json")
            cfg = _config(EvalConfig, "evaluate", model, options)
        _no_options(model, options, "evaluate")
        return run(cfg, command=shlex.join(["llmprune", "eval", *cfg.cli_args()]), progress=progress)


def finetune(model: str | FinetuneConfig, /, *, progress: bool = True, **options) -> dict:
    """Fine-tune a pruned ``model`` keeping its sparsity exactly, with the finetune command's options as
    keywords (``output``, ``steps``, ``mode``, ``data``, ``lr``, ``eval``, ...), or per a
    :class:`llmprune.config.FinetuneConfig`; returns the recipe (llmprune.json)."""
    from .finetuning import finetune as run

    with _named_as_keywords():
        cfg = model if isinstance(model, FinetuneConfig) else _config(FinetuneConfig, "finetune", model, options)
        _no_options(model, options, "finetune")
        return run(cfg, command=shlex.join(["llmprune", "finetune", *cfg.cli_args()]), progress=progress)


def load(folder, **kwargs):
    """An ordinary transformers model from an llmprune output, dense or sparse-bitmask; ``kwargs`` go
    to ``from_pretrained`` (``dtype``, ``device_map``, ...)."""
    from .sharing import load as run

    return run(folder, **kwargs)


def _config(cls: type[Options], function: str, model: str, options: dict) -> Options:
    """``cls(model, **options)``; an option ``cls`` does not take is a TypeError naming it."""
    names = {f.name for f in dataclasses.fields(cls)} - {"model"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"{function}() got unexpected option(s) {', '.join(unknown)}; "
                        f"it takes: {', '.join(sorted(names))}")
    return cls(model=str(model), **options)


def _prune_config(model: str, options: dict) -> PruneConfig:
    """A PruneConfig from keywords, the fine-tune's prefixed ``finetune_`` as on the command line."""
    tune = {name: options.pop(f"finetune_{name}") for name in FINETUNE_TRAINING if f"finetune_{name}" in options}
    if tune.get("steps"):
        options["finetune"] = FinetuneConfig(model="", **tune)
    elif tune:
        raise LlmpruneError(f"finetune_{next(iter(tune))}= needs finetune_steps= above 0")
    if "finetune" in options and not isinstance(options["finetune"], FinetuneConfig):
        raise TypeError("prune() takes the fine-tune's options as finetune_steps=, finetune_lr=, ...")
    return _config(PruneConfig, "prune", model, options)


def _no_options(model: object, options: dict, function: str) -> None:
    if isinstance(model, Options) and options:
        raise TypeError(f"{function}() takes options either in its config object or as keywords, not both "
                        f"(got {', '.join(sorted(options))})")


_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


@contextmanager
def _named_as_keywords() -> Iterator[None]:
    """Errors that name a command-line flag (``--calib-data``) name the keyword instead (``calib_data=``)."""
    try:
        yield
    except LlmpruneError as err:
        text = _FLAG.sub(lambda m: m.group(1).replace("-", "_") + "=", str(err))
        if text == str(err):
            raise
        raise LlmpruneError(text) from None


# Plain AutoModelForCausalLM.from_pretrained reads sparse-bitmask outputs once llmprune is imported.
_install_sparse_reader()
