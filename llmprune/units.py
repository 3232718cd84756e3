"""Structured units of a decoder layer, found from the model itself: MLP channels and attention
heads (which rows and columns of which linears each owns), and the config values a smaller model
needs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from .arch import Layout, _is_linear, build_skeleton, find_layers
from .errors import LlmpruneError

_INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


@dataclass(frozen=True)
class Owned:
    """The positions of one tensor of a decoder layer that belong to units, along one stored dim."""
    name: str  # parameter name inside the layer, e.g. "mlp.up_proj.weight"
    dim: int  # stored dimension the positions run along
    owner: torch.Tensor  # (size along dim,) int64: the unit of each position, -1 for none


@dataclass(frozen=True)
class Units:
    """The units of one kind in one decoder layer.

    Units are removed in equal numbers from each of ``blocks`` blocks of ``per_block`` (query heads
    within their KV group), so the result stays expressible by one config; unit ``u`` lies in block
    ``u // per_block``. ``readout`` is the writer weight: its input columns carry the units' outputs.
    """

    kind: str
    blocks: int
    per_block: int
    tensors: tuple[Owned, ...]
    readout: Owned

    @property
    def count(self) -> int:
        return self.blocks * self.per_block


@dataclass(frozen=True)
class Dims:
    """The sizes structured pruning reads from a text config."""
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int | None
    intermediate_key: str | None


def dims_of(config: PretrainedConfig) -> Dims:
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    key = next((k for k in _INTERMEDIATE_KEYS if hasattr(text, k)), None)
    inter = getattr(text, key) if key else None
    if key == "n_inner" and inter is None:
        inter = 4 * text.hidden_size  # GPT-2's convention for an unset n_inner
    return Dims(text.hidden_size, heads, kv_heads, head_dim, inter if isinstance(inter, int) else None, key)


def _out_in(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, Conv1D) else (w.shape[0], w.shape[1])


def _is_attention(path: str) -> bool:
    return any("attn" in part.lower() or "attention" in part.lower() for part in path.split("."))


def _split(layer: nn.Module, attention: bool, width: int, hidden: int, what: str) -> tuple[list, tuple[str, nn.Module]]:
    """The readers (hidden -> k x width) and the one writer (width -> hidden) of a layer part."""
    linears = [(n, m) for n, m in layer.named_modules() if _is_linear(m) and _is_attention(n) == attention]
    writers = [(n, m) for n, m in linears if _out_in(m) == (hidden, width)]
    if not writers:
        raise LlmpruneError(f"cannot find the {what} output projection ({width} -> {hidden}) in the decoder layer")
    writer = writers[-1]
    readers = [(n, m) for n, m in linears if (n, m) != writer]
    for n, m in readers:
        out, inp = _out_in(m)
        if inp != hidden or (not attention and out % width):
            raise LlmpruneError(f"cannot prune {what} structurally: unrecognised linear {n} ({inp} -> {out})")
    return readers, writer


def _owned_rows(name: str, module: nn.Module, owner: torch.Tensor) -> list[Owned]:
    """A reader's output positions (weight rows, bias entries) owned per ``owner``."""
    out = [Owned(f"{name}.weight", 1 if isinstance(module, Conv1D) else 0, owner)]
    if getattr(module, "bias", None) is not None:
        out.append(Owned(f"{name}.bias", 0, owner))
    return out


def _readout(name: str, module: nn.Module, owner: torch.Tensor) -> Owned:
    return Owned(f"{name}.weight", 0 if isinstance(module, Conv1D) else 1, owner)


def mlp_channels(layout: Layout, index: int) -> Units:
    """MLP intermediate channels: a row of every MLP reader (each chunk of a fused gate|up) and a
    column of the MLP writer."""
    d = dims_of(layout.config)
    if d.intermediate is None:
        raise LlmpruneError("cannot prune channels: the config has no single intermediate size "
                            f"({', '.join(_INTERMEDIATE_KEYS)})")
    readers, (wname, writer) = _split(layout.layer_module(index), False, d.intermediate, d.hidden, "MLP")
    if not readers:
        raise LlmpruneError("cannot prune channels: the MLP has no input projection")
    channel = torch.arange(d.intermediate)
    tensors = []
    for name, module in readers:
        chunks = _out_in(module)[0] // d.intermediate  # fused gate|up: unit j owns row c * I + j
        tensors += _owned_rows(name, module, channel.repeat(chunks))
    readout = _readout(wname, writer, channel)
    return Units("channels", 1, d.intermediate, (*tensors, readout), readout)


def attention_heads(layout: Layout, index: int, whole_groups: bool) -> Units:
    """Query heads within their KV group, or (``whole_groups``, and always without grouped-query
    attention) KV groups with their query heads; the attention output's columns follow."""
    d = dims_of(layout.config)
    group = d.heads // d.kv_heads
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    readers, (wname, writer) = _split(layout.layer_module(index), True, q, d.hidden, "attention")
    whole = whole_groups or group == 1
    head = torch.arange(d.heads).repeat_interleave(d.head_dim)  # q position -> query head
    q_owner = head // group if whole else head
    kv_owner = torch.arange(d.kv_heads).repeat_interleave(d.head_dim) if whole else torch.full((kv,), -1)
    tensors = []
    for name, module in readers:
        out = _out_in(module)[0]
        if out == q + 2 * kv:  # fused q|k|v
            owner = torch.cat([q_owner, kv_owner, kv_owner])
        elif out == q:
            owner = q_owner
        elif out == kv:
            owner = kv_owner
        else:
            raise LlmpruneError(f"cannot prune heads: attention linear {name} has {out} outputs, expected "
                                f"{q} (queries), {kv} (keys or values) or {q + 2 * kv} (fused)")
        tensors += _owned_rows(name, module, owner)
    readout = _readout(wname, writer, q_owner)
    if whole:
        return Units("kv-heads", 1, d.kv_heads, (*tensors, readout), readout)
    return Units("heads", d.kv_heads, group, (*tensors, readout), readout)


def units_of(layout: Layout, index: int, pattern: str) -> Units:
    if pattern == "channels":
        return mlp_channels(layout, index)
    return attention_heads(layout, index, whole_groups=pattern == "kv-heads")


def shrunk_config_values(layout: Layout, units: Units, kept_per_block: int) -> dict[str, int]:
    """Config attributes (canonical names) describing a model whose layers keep ``kept_per_block``."""
    d = dims_of(layout.config)
    if units.kind == "channels":
        return {d.intermediate_key: kept_per_block}
    if units.kind == "heads":
        return {"num_attention_heads": d.kv_heads * kept_per_block, "num_key_value_heads": d.kv_heads,
                "head_dim": d.head_dim}
    group = d.heads // d.kv_heads
    return {"num_attention_heads": kept_per_block * group, "num_key_value_heads": kept_per_block,
            "head_dim": d.head_dim}


def without_layers(layout: Layout, dropped: set[int]) -> dict[str, object]:
    """Config attributes of the model without decoder layers ``dropped``: the layer count, and every
    per-layer list (e.g. ``layer_types``) cut to the kept layers."""
    text = layout.config.get_text_config()
    kept = [i for i in range(layout.num_layers) if i not in dropped]
    values: dict[str, object] = {"num_hidden_layers": len(kept)}
    for key, value in text.to_dict().items():
        if isinstance(value, list) and len(value) == layout.num_layers and key != "architectures":
            values[key] = [value[i] for i in kept]
    return values


def edit_config_json(config: PretrainedConfig, data: dict, values: dict[str, object]) -> dict:
    """``data`` (a config.json) with canonical attribute ``values`` written under their JSON keys
    (GPT-2's n_layer for num_hidden_layers), inside ``text_config`` for multimodal configs."""
    text = config.get_text_config()
    target = data
    if text is not config:
        key = next(k for k, v in vars(config).items() if v is text)
        target = data.setdefault(key, {})
    mapping = getattr(type(text), "attribute_map", {}) or {}
    for name, value in values.items():
        target[mapping.get(name, name)] = value
    return data


def edited_config(layout: Layout, values: dict[str, object]) -> PretrainedConfig:
    """A copy of the model's config with canonical attribute ``values`` set, validated by the config
    class as ``from_pretrained`` will validate the output's; refuses with transformers' reason."""
    config = copy.deepcopy(layout.config)
    text = config.get_text_config()
    for name, value in values.items():
        setattr(text, name, value)
    try:
        # from_dict runs the config class's own validation, as from_pretrained will on the output
        type(text).from_dict(text.to_dict())
    except Exception as err:  # transformers' validators raise their own error classes
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else type(err).__name__
        raise LlmpruneError(f"{type(text).__name__} cannot express the pruned model: {reason}") from None
    return config


def check_expressible(layout: Layout, values: dict[str, object], shapes: dict[int, dict[str, tuple[int, ...]]],
                      outside: dict[str, tuple[int, ...]] | None = None) -> nn.ModuleList:
    """Refuse unless transformers builds, from the config edited with ``values``, decoder layers with
    exactly ``shapes`` (output layer index -> layer-relative parameter name -> planned shape) and, when
    given, exactly the ``outside`` parameters (model name -> planned shape) outside the layers;
    returns those decoder layers (meta device)."""
    config = edited_config(layout, values)
    text = config.get_text_config()
    try:
        model = build_skeleton(config)
        path, layers = find_layers(model)
    except (LlmpruneError, RuntimeError, AssertionError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LlmpruneError(f"{type(text).__name__} cannot express the pruned model: {reason}") from None
    settings = ", ".join(f"{k}={v}" for k, v in values.items() if not isinstance(v, list))
    for index, planned in shapes.items():
        built = {n: tuple(p.shape) for n, p in layers[index].named_parameters()}
        for name, shape in planned.items():
            if built.get(name) != shape:
                raise LlmpruneError(f"{type(text).__name__} cannot express the pruned model: {name} would be "
                                    f"{shape}, but the edited config ({settings}) builds {built.get(name)}")
    if outside is not None:
        built = {n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith(path + ".")}
        for name in sorted(set(built) | set(outside)):
            if built.get(name) != outside.get(name):
                raise LlmpruneError(f"{type(text).__name__} cannot express the pruned model: {name} would be "
                                    f"{outside.get(name)}, but the edited config ({settings}) builds {built.get(name)}")
    return layers


def renumbered(layout: Layout, checkpoint_name: str, new_index: int) -> str:
    """A decoder-layer tensor's checkpoint name with its layer index replaced by ``new_index``."""
    old = layout.checkpoint_name(layout.layer_prefix(layout.layer_of(checkpoint_name)))
    return layout.checkpoint_name(layout.layer_prefix(new_index)) + checkpoint_name[len(old):]


# --- the residual (hidden) width -------------------------------------------------------------
#
# The residual stream of width d runs from the input embedding through every decoder layer to the
# final norm and the head. A dimension i of it is: column i of the input embedding and of the head,
# entry i of every norm on the stream, input column i of every linear that reads the stream (the
# attention and MLP readers of ``_split``), and output row i (and bias entry) of every linear that
# writes it (their writers). Removing i from all of them gives the model whose stream never carries i.

ROLES = ("embedding", "head", "reader", "writer", "norm")


@dataclass(frozen=True)
class Residual:
    """Every parameter along the residual width, by model parameter name: (its dimension along the
    width, its role in ``ROLES``), with each norm weight's offset (1 when the norm scales by 1 + w,
    as Gemma's do; else 0)."""
    hidden: int
    dims: dict[str, tuple[int, str]]
    offsets: dict[str, float]
    tied: bool  # the head is the input embedding's weight

    def shape(self, name: str, shape: tuple[int, ...], kept: int) -> tuple[int, ...]:
        """``shape`` of model parameter ``name`` once the width is ``kept``."""
        if name not in self.dims:
            return shape
        out = list(shape)
        out[self.dims[name][0]] = kept
        return tuple(out)

    def norms(self) -> list[str]:
        return [n for n, (_, role) in self.dims.items() if role == "norm" and n.endswith("weight")]


def _norm_offset(name: str, module: nn.Module, hidden: int) -> float:
    """How norm ``module`` applies its weight w: as w (0) or as 1 + w (1), by running a copy on a
    random input with w = 0 and then w = -offset (the output must vanish)."""
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(0))

    def run(weight: float) -> torch.Tensor:
        probe = copy.deepcopy(module)
        for pname, p in list(probe.named_parameters(recurse=False)):
            setattr(probe, pname, nn.Parameter(torch.full(p.shape, weight if pname == "weight" else 0.0)))
        with torch.no_grad():
            return probe(x)

    offset = 0.0 if bool((run(0.0) == 0).all()) else 1.0
    if offset and not bool((run(-1.0).abs() < 1e-6).all()):
        raise LlmpruneError(f"cannot prune the hidden width: {name} is a norm whose weight is applied neither as "
                            "w nor as 1 + w")
    return offset


def embedding_scale(model: nn.Module, hidden: int) -> float:
    """What the input embedding multiplies its rows by (Gemma: sqrt(hidden_size); else 1), by running
    a copy of it with one row of ones."""
    probe = copy.deepcopy(model.get_input_embeddings())
    probe.weight = nn.Parameter(torch.ones(1, hidden))
    with torch.no_grad():
        return float(probe(torch.zeros(1, 1, dtype=torch.long)).reshape(-1)[0])


def _stream_norms(parent: nn.Module, prefix: str, hidden: int, skip: set[int]) -> dict[str, nn.Module]:
    """Children of ``parent`` that are norms on the stream: no linear, one 1-D weight of the width."""
    out = {}
    for name, child in parent.named_children():
        if id(child) in skip or _is_linear(child) or isinstance(child, nn.Embedding):
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (hidden,) and \
                all(p.dim() == 1 for p in child.parameters()):
            out[prefix + name] = child
    return out


def residual_of(layout: Layout) -> Residual:
    """Where the residual width runs, found from the model: embeddings from the model's own accessors,
    readers and writers as for channels and heads (``_split``), norms as the 1-D children of width d
    of each decoder layer and of the model outside the layers. Refuses a model with any other
    parameter along the width, naming it."""
    d = dims_of(layout.config)
    model, hidden = layout.skeleton, d.hidden
    dims: dict[str, tuple[int, str]] = {}
    offsets: dict[str, float] = {}
    leave: set[str] = set()  # parameters of width d that are not on the stream (readers' biases)

    def add_norms(norms: dict[str, nn.Module]) -> None:
        for name, module in norms.items():
            for pname, _ in module.named_parameters(recurse=False):
                dims[f"{name}.{pname}"] = (0, "norm")
            offsets[f"{name}.weight"] = _norm_offset(name, module, hidden)

    for index in range(layout.num_layers):
        layer, prefix = layout.layer_module(index), layout.layer_prefix(index)
        linears = []
        if d.intermediate is not None:
            linears.append(_split(layer, False, d.intermediate, hidden, "MLP"))
        linears.append(_split(layer, True, d.heads * d.head_dim, hidden, "attention"))
        for readers, (wname, writer) in linears:
            for name, module in readers:
                dims[f"{prefix}{name}.weight"] = (0 if isinstance(module, Conv1D) else 1, "reader")
                leave.add(f"{prefix}{name}.bias")
            dims[f"{prefix}{wname}.weight"] = (1 if isinstance(writer, Conv1D) else 0, "writer")
            if getattr(writer, "bias", None) is not None:
                dims[f"{prefix}{wname}.bias"] = (0, "writer")
        add_norms(_stream_norms(layer, prefix, hidden, set()))

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    dims[names[id(embedding.weight)]] = (1, "embedding")
    # the meta skeleton is not tied yet: the config says whether loading ties the head to the embedding
    tied = head is not None and (head.weight is embedding.weight or (
        bool(getattr(layout.config, "tie_word_embeddings", False)) and head.weight.shape == embedding.weight.shape))
    if head is not None:
        for n, p in model.named_parameters(remove_duplicate=False):
            if p is head.weight:
                dims[n] = (1, "head")
    layers = model.get_submodule(layout.layers_path)
    for path, module in model.named_modules():
        if module is layers or path.startswith(layout.layers_path + "."):
            continue
        add_norms(_stream_norms(module, f"{path}." if path else "", hidden, {id(layers), id(embedding), id(head)}))
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in dims and name not in leave and hidden in p.shape:
            raise LlmpruneError(f"cannot prune the hidden width: {name} {tuple(p.shape)} lies along it but is "
                                "neither an embedding, a norm, nor a linear reading or writing the residual stream")
    return Residual(hidden, dims, offsets, tied)


def hidden_config_values(layout: Layout, kept: int) -> dict[str, int]:
    """Config attributes of the model whose residual width is ``kept``: hidden_size, and every size
    transformers would otherwise derive from it written explicitly (head_dim, GPT-2's n_inner)."""
    d = dims_of(layout.config)
    text = layout.config.get_text_config()
    values = {"hidden_size": kept, "head_dim": d.head_dim}
    if d.intermediate_key is not None and getattr(text, d.intermediate_key, None) is None:
        values[d.intermediate_key] = d.intermediate
    return values
