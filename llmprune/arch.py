"""The only module that knows model structure.

Everything is discovered from the model class transformers builds for a ``config.json``, on the
meta device, with no per-family tables: the decoder layers are the ModuleList whose children are
the classes the model lists in ``_no_split_modules``; the prunable weights are the 2-D weights of
the linear layers (``nn.Linear`` and GPT-2's transposed ``Conv1D``) inside those layers.

Multimodal (image-text-to-text) checkpoints are built with their own class; the decoder layers
are the language model's (the module holding ``get_input_embeddings()``), and the vision tower and
projector are tensors outside the decoder layers, written unchanged unless ``--prune-vision``
prunes their linears (``Layout.outside_linears``: the linears of every module beside the language
model and the head). Checkpoint names that
transformers renames on load (``language_model.model.layers`` -> ``model.language_model.layers``,
GPT-NeoX's ``embed_out`` -> ``lm_head``) are mapped by its own renaming rules
(``conversion.prefix_renamings``, given to ``Layout.match_checkpoint``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from .errors import LlmpruneError
from .progress import track


@dataclass(frozen=True)
class Linear:
    """One prunable matrix of a decoder layer."""

    name: str  # module path inside the layer, e.g. "self_attn.q_proj"
    transposed: bool  # Conv1D stores the weight as (in, out)

    @property
    def weight(self) -> str:
        return f"{self.name}.weight"


@dataclass
class Layout:
    """Where things live in one model: its decoder layers and their prunable matrices.

    Names here are the model's own parameter names; ``checkpoint_name`` maps them to the names
    stored in the checkpoint (some checkpoints omit the base-model prefix, e.g. GPT-2's ``h.0``).
    """

    config: PretrainedConfig
    skeleton: nn.Module  # the whole model, parameters on the meta device
    layers_path: str  # e.g. "model.layers"
    linears: list[list[Linear]]  # per layer index
    prefix_to_strip: str = ""  # checkpoint names lack this prefix (set by match_checkpoint)
    # Whole-name renamings transformers applies on load (set by match_checkpoint): in-memory prefix
    # -> on-disk prefix, longest first, e.g. ("model.language_model.", "language_model.model.").
    renamed_prefixes: list[tuple[str, str]] = field(default_factory=list)
    _to_memory: dict[str, str] = field(default_factory=dict, repr=False)
    _layers: nn.ModuleList = field(default=None, repr=False)
    # Mixtures of experts, filled by ``source.match_experts`` (arch and experts are independent
    # modules of one layer): per layer index its ``experts.MoeBlock``s and its ``experts.Expert``
    # matrices, and the ``conversion.LayerPlan`` of each layer whose tensors are not stored one to one.
    moe: list[list] = field(default_factory=list)
    experts: list[list] = field(default_factory=list)
    plans: dict[int, object] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.linears)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def layer_module(self, index: int) -> nn.Module:
        """The meta-device module of decoder layer ``index`` (shared; copy before materialising)."""
        return self._layers[index]

    def linear_names(self, index: int) -> list[tuple[Linear, str]]:
        """Layer ``index``'s prunable matrices with their checkpoint tensor names."""
        prefix = self.layer_prefix(index)
        return [(linear, self.stored_name(index, self.checkpoint_name(prefix + linear.weight)))
                for linear in self.linears[index]]

    def expert_matrices(self, index: int) -> list:
        """Layer ``index``'s routed expert matrices (``experts.Expert``), each a prunable matrix."""
        return self.experts[index] if self.experts else []

    def plan(self, index: int):  # -> conversion.LayerPlan | None
        """How layer ``index``'s checkpoint tensors become its parameters, when not one to one."""
        return self.plans.get(index)

    def stored_name(self, index: int, name: str) -> str:
        """The checkpoint name of an unfused in-memory tensor ``name`` of layer ``index`` (renamed on
        load, e.g. Mixtral's ``mlp.gate`` is ``block_sparse_moe.gate`` on disk)."""
        plan = self.plans.get(index)
        if plan is None or name not in plan.targets or plan.group(name).fused:
            return name
        return plan.group(name).sources[0]

    @property
    def text_config(self) -> PretrainedConfig:
        """The language model's config (the config itself for a text-only model)."""
        return self.config.get_text_config()

    def checkpoint_name(self, model_name: str) -> str:
        """The on-disk name of an in-memory name (or name prefix)."""
        if self.prefix_to_strip and model_name.startswith(self.prefix_to_strip):
            model_name = model_name[len(self.prefix_to_strip):]
        for memory, disk in self.renamed_prefixes:
            if model_name.startswith(memory):
                return disk + model_name[len(memory):]
        return model_name

    def model_name(self, checkpoint_name: str) -> str:
        """The in-memory name of an on-disk name."""
        name = self._to_memory.get(checkpoint_name, checkpoint_name)
        if self.prefix_to_strip and not name.startswith(self.prefix_to_strip):
            return self.prefix_to_strip + name
        return name

    def layer_of(self, checkpoint_name: str) -> int | None:
        """Decoder layer index of a checkpoint tensor, or None for tensors outside the layers."""
        name = self.model_name(checkpoint_name)
        head = self.layers_path + "."
        if not name.startswith(head):
            return None
        index = name[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() and int(index) < self.num_layers else None

    def match_checkpoint(self, names: set[str], rename: Callable[[str], str] | None = None) -> None:
        """Learn how the checkpoint's names become the model's: ``rename`` (transformers' whole-name
        renamings, on-disk -> in-memory), then whether they carry the base-model prefix.

        Raises when the checkpoint holds none of the decoder layers' weights.
        """
        if rename is not None:
            self._learn_renamings(names, rename)
        probe = self.layer_prefix(0) + self.linears[0][0].weight if self.linears and self.linears[0] else None
        if probe is None:
            return
        if self.checkpoint_name(probe) in names:
            return
        base = getattr(self.skeleton, "base_model_prefix", "")
        if base and probe.startswith(base + ".") and probe[len(base) + 1:] in names:
            self.prefix_to_strip = base + "."
            return
        raise LlmpruneError(f"the checkpoint has no tensor {self.checkpoint_name(probe)!r}: weights do not match "
                            "config.json")

    def _learn_renamings(self, names: set[str], rename: Callable[[str], str]) -> None:
        """The prefix pairs of the renamings ``rename`` applies to these ``names``; each name must map
        back to itself, or the checkpoint's names are refused."""
        pairs: dict[str, str] = {}
        for name in sorted(names):
            memory = rename(name)
            if memory == name:
                continue
            self._to_memory[name] = memory
            disk_prefix, memory_prefix = _differing_prefixes(name, memory)
            if pairs.setdefault(memory_prefix, disk_prefix) != disk_prefix:
                raise LlmpruneError(f"{type(self.skeleton).__name__}: checkpoint names {pairs[memory_prefix]!r}... "
                                    f"and {disk_prefix!r}... both load as {memory_prefix!r}...")
        self.renamed_prefixes = sorted(pairs.items(), key=lambda p: -len(p[0]))
        for name, memory in self._to_memory.items():
            if self.checkpoint_name(memory) != name:
                raise LlmpruneError(f"{type(self.skeleton).__name__}: cannot map {memory!r} back to the checkpoint's "
                                    f"{name!r}")

    def outside_language_model(self) -> dict[str, int]:
        """Sub-models beside the language model (a vision tower, a projector), by checkpoint name
        prefix, with their parameter counts; empty for a text-only model. Pruned only on request
        (``outside_linears``)."""
        return {self.checkpoint_name(path + ".").rstrip("."): sum(p.numel() for p in module.parameters())
                for path, module in self._outside_parts().items()}

    def outside_linears(self) -> list[tuple[Linear, str]]:
        """The linears of the sub-models beside the language model (``outside_language_model``), each
        named by its whole in-memory path, with its checkpoint weight name; patch convolutions,
        embeddings, norms and bare parameters (Gemma 3's projection matrix) are not linears."""
        out = []
        for path, part in self._outside_parts().items():
            for name, module in part.named_modules():
                if _is_linear(module):
                    linear = Linear(f"{path}.{name}", isinstance(module, Conv1D))
                    out.append((linear, self.checkpoint_name(linear.weight)))
        return out

    def _outside_parts(self) -> dict[str, nn.Module]:
        """The outermost modules holding none of the language model's or the head's parameters, by
        in-memory path; empty for a text-only model."""
        if self.text_config is self.config:
            return {}
        language = _language_model_path(self.skeleton)
        head = self.skeleton.get_output_embeddings()
        keep = {id(p) for p in head.parameters()} if head is not None else set()
        if language is not None:
            keep |= {id(p) for p in self.skeleton.get_submodule(language).parameters()}
        parts: dict[str, nn.Module] = {}
        for path, module in self.skeleton.named_modules():
            if not path or any(path.startswith(p + ".") for p in parts):
                continue
            params = list(module.parameters())
            if params and not any(id(p) in keep for p in params):
                parts[path] = module
        return parts


def _differing_prefixes(disk: str, memory: str) -> tuple[str, str]:
    """The prefixes of two names that differ before their longest common dotted suffix:
    ("language_model.model.", "model.language_model.") for ``language_model.model.norm.weight`` and
    ``model.language_model.norm.weight``."""
    a, b = disk.split("."), memory.split(".")
    common = 0
    while common < min(len(a), len(b)) and a[-1 - common] == b[-1 - common]:
        common += 1
    return "".join(p + "." for p in a[:len(a) - common]), "".join(p + "." for p in b[:len(b) - common])


def load_config(folder: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LlmpruneError(f"cannot read config.json in {folder}: {reason}") from None


def is_multimodal(config: PretrainedConfig) -> bool:
    """Whether the config wraps a language model's config beside others (a vision tower's)."""
    return config.get_text_config() is not config


def model_class(config: PretrainedConfig):
    """The class ``from_pretrained`` loads the checkpoint with: a causal LM, or for a multimodal
    config its own class (the ``architectures`` entry), else ``AutoModelForImageTextToText``."""
    if not is_multimodal(config):
        return AutoModelForCausalLM
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and \
                isinstance(config, cls.config_class):
            return cls
    return AutoModelForImageTextToText


def build_skeleton(config: PretrainedConfig) -> nn.Module:
    """The model with parameters on the meta device; buffers (rotary tables) stay real."""
    cls = model_class(config)
    try:
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls._from_config(config)
    except (ValueError, KeyError, ImportError, TypeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = "a causal LM" if cls is AutoModelForCausalLM else f"{config.model_type} ({cls.__name__})"
        raise LlmpruneError(f"transformers cannot build {what} from this config: {reason}") from None
    return model.eval()


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def _language_model_path(model: nn.Module) -> str | None:
    """The path of the module holding the input embeddings ("model.language_model", "transformer")."""
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    path = next((p for p, m in model.named_modules() if m is embeddings), None)
    return None if path is None else path.rpartition(".")[0]


def language_model(model: nn.Module) -> nn.Module:
    """The smallest module holding both the input embeddings and the head, whose forward maps token
    ids to logits: the model itself, or the causal LM inside a multimodal wrapper (Llama 4's
    ``language_model``). Text-only evaluation and calibration run through it."""
    try:
        ends = [model.get_input_embeddings(), model.get_output_embeddings()]
    except (NotImplementedError, AttributeError):
        return model
    paths = [next((p for p, m in model.named_modules() if m is end), None) for end in ends]
    if None in paths:
        return model
    common = []
    for a, b in zip(*(p.split(".") for p in paths)):
        if a != b:
            break
        common.append(a)
    while common:
        module = model.get_submodule(".".join(common))
        if isinstance(module, transformers.PreTrainedModel) and module.get_output_embeddings() is ends[1]:
            return module
        common.pop()
    return model


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: the ModuleList of ``_no_split_modules`` blocks with most parameters inside
    the language model (the module holding the input embeddings).

    Multimodal models list their vision blocks too; those lie outside the language model.
    """
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    language = _language_model_path(model)
    within = "" if not language else language + "."
    candidates = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
            type(child).__name__ in block_names for child in module
        ):
            size = sum(p.numel() for p in module.parameters())
            candidates.append((size, path, module))
    if not candidates:
        raise LlmpruneError(
            f"no decoder layers found in {type(model).__name__} (no ModuleList of {sorted(block_names) or 'known blocks'})"
        )
    inside = [c for c in candidates if c[1].startswith(within)]
    _, path, layers = max(inside or candidates, key=lambda c: c[0])
    return path, layers


def layout_of(config: PretrainedConfig) -> Layout:
    """Discover the layout of the model ``config`` describes, without allocating its weights."""
    skeleton = build_skeleton(config)
    path, layers = find_layers(skeleton)
    linears = [
        [Linear(name, isinstance(module, Conv1D)) for name, module in layer.named_modules() if _is_linear(module)]
        for layer in layers
    ]
    if not any(linears):
        raise LlmpruneError("no prunable linear layers found inside the decoder layers")
    return Layout(config, skeleton, path, linears, _layers=layers)


def as_out_in(weight: torch.Tensor, linear: Linear) -> torch.Tensor:
    """The weight as (out_features, in_features), the layout criteria and masks expect."""
    return weight.t() if linear.transposed else weight


def materialize(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of a meta-device ``module`` holding ``state`` (names relative to the module)."""
    real = copy.deepcopy(module)
    real.load_state_dict(state, strict=True, assign=True)
    return real


class _StopForward(Exception):
    """Raised by the last layer stand-in: nothing after the decoder layers is needed."""


class _LayerStandIn(nn.Module):
    """Takes a decoder layer's place to see what the model passes it, without its weights.

    ``record``: keep the call's extra arguments (masks, position ids, rotary tables) per layer and
    pass the hidden state through; ``replace``: the first stand-in returns prepared hidden states
    instead, so the model's own code (final norm, head, soft-capping) finishes the forward.
    """

    def __init__(self, index: int, hook: "_Hook"):
        super().__init__()
        self.index, self.hook = index, hook

    def forward(self, hidden_states, *args, **kwargs):
        return self.hook(self.index, hidden_states, args, kwargs)


class _Hook:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.calls: list[tuple[tuple, dict]] = []
        self.first_input: torch.Tensor | None = None
        self.replacement: torch.Tensor | None = None
        self.stop = True

    def __call__(self, index, hidden, args, kwargs):
        if self.replacement is not None:
            return self.replacement if index == 0 else hidden
        if index == 0:
            self.first_input = hidden
        self.calls.append((args, kwargs))
        if self.stop and index == self.num_layers - 1:
            raise _StopForward
        return hidden


@dataclass
class LayerCalls:
    """What the model passes each decoder layer besides the hidden state, for one batch shape."""

    calls: list[tuple[tuple, dict]]  # per layer: positional and keyword arguments

    def run(self, module: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index`` (as ``module``) applied to ``hidden`` (B, T, C)."""
        args, kwargs = self.calls[index]
        out = module(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class ModelWithoutLayers:
    """The model without its decoder layers: embeddings, rotary tables, final norm and head.

    Materialised from the checkpoint on ``device`` (the layers stay stand-ins), it produces each
    layer's inputs for a batch and turns final hidden states into logits through the model's own
    forward, so no per-family knowledge of masks, positions or heads is needed.
    """

    def __init__(self, layout: Layout, read: "callable", device: torch.device, dtype: torch.dtype | None = None):
        model = build_skeleton(layout.config)
        _, layers = find_layers(model)
        self.hook = _Hook(len(layers))
        for i in range(len(layers)):
            layers[i] = _LayerStandIn(i, self.hook)
        self.model = language_model(fill_parameters(model, layout, read, device, dtype))
        self.device = device

    @torch.no_grad()
    def layer_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, LayerCalls]:
        """Hidden states entering layer 0 for ``input_ids`` (B, T), and every layer's other arguments."""
        self.hook.calls, self.hook.first_input, self.hook.stop = [], None, True
        try:
            self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        calls = LayerCalls(self.hook.calls)
        self.hook.calls = []
        return self.hook.first_input, calls

    def logits(self, input_ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) from the last decoder layer's output, via the model's own forward."""
        self.hook.replacement, self.hook.stop = final_hidden, False
        try:
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits
        finally:
            self.hook.replacement, self.hook.stop = None, True


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def fill_parameters(model: nn.Module, layout: Layout, read: "callable", device: torch.device,
                    dtype: torch.dtype | None = None, progress: bool = False, desc: str = "load") -> nn.Module:
    """``model``'s meta-device parameters read from the checkpoint one tensor at a time onto
    ``device`` (cast to ``dtype``); parameters the checkpoint omits must be tied ones (a head
    sharing the embedding), which are tied afterwards. Memory: the model plus one tensor."""

    names = [name for name, param in model.named_parameters(remove_duplicate=False) if param.is_meta]
    missing = []
    converted: tuple[int | None, dict[str, torch.Tensor]] = (None, {})  # one planned layer at a time
    for name in track(names, desc, "tensor", enabled=progress):
        stored = layout.checkpoint_name(name)
        index = layout.layer_of(stored)
        plan = layout.plan(index) if index is not None else None
        if plan is not None and stored in plan.targets:
            if converted[0] != index:
                converted = (index, {})  # free the previous layer's conversions first
                converted = (index, plan.to_memory({n: read(n) for g in plan.groups for n in g.sources}))
            tensor = converted[1].pop(stored)
            _set_tensor(model, name, tensor.to(device=device, dtype=dtype or tensor.dtype))
            continue
        try:
            tensor = read(stored)
        except KeyError:
            missing.append(name)
            continue
        _set_tensor(model, name, tensor.to(device=device, dtype=dtype or tensor.dtype))
    if missing:
        model.tie_weights()
        still = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
        if still:
            raise LlmpruneError(f"the checkpoint lacks {still[0]!r}")
    return model.to(device)


def load_whole(layout: Layout, read: "callable", device: torch.device, dtype: torch.dtype | None = None,
               progress: bool = True, desc: str = "load") -> nn.Module:
    """The whole model, as ``from_pretrained`` builds it, read tensor by tensor with a progress bar
    (sparse-bitmask folders included, through ``read``); in eval mode."""
    return fill_parameters(build_skeleton(layout.config), layout, read, device, dtype, progress, desc).eval()


def context_length(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's positions allow, or None when the config does not say."""
    config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --- structured units -------------------------------------------------------------------------
#
# A unit is what structured pruning removes whole: an MLP channel (a row of each MLP input linear
# and the matching column of its output linear), a query head (its rows of q and its columns of
# the attention output), or a KV group (its key and value rows with all its query heads). Units
# are found from the config's sizes and the layer's linear shapes: the attention linears are those
# under a submodule named like "attn"/"attention" (every transformers decoder), the others form the
# MLP. A linear reads the layer's hidden size and writes units ("reader"), or reads units and writes
# the hidden size ("writer", the last such linear in definition order when shapes are square).


