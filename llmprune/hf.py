"""Plain ``AutoModelForCausalLM.from_pretrained`` for llmprune's sparse-bitmask checkpoints.

Importing llmprune registers, through transformers' ``register_quantization_config`` and
``register_quantizer`` hooks, a "quantization" method ``llmprune-sparse`` whose only job is to
decompress each matrix's ``weight_bitmask``, ``weight_values`` and ``weight_shape`` into an
ordinary ``weight`` while the checkpoint is loaded. The model that comes back is a plain
transformers model (no quantization config, no special modules), bit-identical to the dense save.

transformers' loading internals (``core_model_loading``) change between releases: registration
is attempted only when the hooks it relies on exist, and :func:`llmprune.load` works without it.
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import sys

import torch

from . import sparse

log = logging.getLogger(__name__)

# transformers' registry of quantizers; importing it (and what registration needs) roughly doubles
# the time `import llmprune` takes, so registration waits until transformers imports it itself.
REGISTRY_MODULE = "transformers.quantizers.auto"


def install() -> None:
    """Register now when transformers' quantizer registry is loaded, else right after it loads."""
    if REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, AfterImport) and f.module == REGISTRY_MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImport(REGISTRY_MODULE, register))


class AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: lets ``module`` load as usual, then calls ``callback()``."""
    def __init__(self, module: str, callback):
        self.module, self.callback = module, callback

    def find_spec(self, name, path, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                load = spec.loader.exec_module

                def exec_module(module, load=load):
                    load(module)
                    sys.modules[name] = module
                    self.callback()

                spec.loader.exec_module = exec_module
                return spec
        return None


def _first(value):
    return value[0] if isinstance(value, list) else value


@functools.cache
def _decompress_op() -> type:
    """The conversion op, built at load time: ``core_model_loading`` cannot be imported while
    transformers is still importing itself."""
    from transformers.core_model_loading import ConversionOps

    class Decompress(ConversionOps):
        """bitmask, values and shape -> the dense weight."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        @torch.no_grad()
        def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
            parts = {part: _first(input_dict[f"weight_{part}"]) for part in sparse.PARTS}
            dense = sparse.decompress(parts, full_layer_name or "weight")
            # the loader casts plain tensors to the model's dtype (from_pretrained(dtype=...)) but
            # leaves what a load op returns as it is: cast here, as for a dense weight
            try:
                param = model.get_parameter(full_layer_name) if model is not None and full_layer_name else None
            except AttributeError:
                param = None
            if param is not None and param.dtype.is_floating_point and dense.is_floating_point():
                dense = dense.to(param.dtype)
            return {full_layer_name: dense}

    return Decompress


def register() -> bool:
    """Register the quantizer with transformers once; False when this transformers lacks the hooks."""
    try:
        from transformers.quantizers.auto import (
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        log.debug("transformers has no quantizer hooks: from_pretrained cannot read %s checkpoints", sparse.FORMAT)
        return False
    if sparse.QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return True
    if not hasattr(HfQuantizer, "get_load_operations"):
        log.debug("transformers' quantizers have no load operations: from_pretrained cannot read %s", sparse.FORMAT)
        return False

    @register_quantization_config(sparse.QUANT_METHOD)
    class SparseBitmaskConfig(QuantizationConfigMixin):
        """The ``quantization_config`` entry of a sparse-bitmask checkpoint."""

        def __init__(self, format: str = sparse.FORMAT, version: int = sparse.VERSION, **kwargs):
            self.quant_method = sparse.QUANT_METHOD
            self.format, self.version = format, version

    @register_quantizer(sparse.QUANT_METHOD)
    class SparseBitmaskQuantizer(HfQuantizer):
        """Decompresses while loading; the model it leaves behind is an ordinary dense model."""

        requires_calibration = False
        serialized_names = {"weight": [f"weight_{part}" for part in sparse.PARTS]}

        def validate_environment(self, *args, **kwargs):
            if self.quantization_config.version != sparse.VERSION:
                raise ValueError(f"{sparse.FORMAT} version {self.quantization_config.version} is not supported "
                                 f"(this llmprune reads version {sparse.VERSION}); upgrade llmprune")

        def get_load_operations(self):
            return {"deserialize": _decompress_op()}

        def _process_model_after_weight_loading(self, model, **kwargs):
            self.remove_quantization_config(model)
            if hasattr(model.config, sparse.CONFIG_KEY):
                delattr(model.config, sparse.CONFIG_KEY)
            return model

        def is_serializable(self):
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    return True
