"""Mixture-of-experts weights: where the experts of a decoder layer live, and how their on-disk
tensors become the parameters transformers builds.

transformers 5 keeps the routed experts of a MoE block as fused 3-D parameters (``experts.gate_up_proj``
(E, 2I, H), ``experts.down_proj`` (E, H, I)), while most Hub checkpoints store one 2-D tensor per expert
(``block_sparse_moe.experts.3.w1.weight``). transformers converts between the two when it loads and
saves, with the rules in ``transformers.conversion_mapping`` (``save_pretrained`` writes the per-expert
names back unless ``save_original_format=False``); ``conversion.plan_layer`` applies those same rules,
and their reverse, to the tensor names of one decoder layer, so a layer streams without the whole model.

Three things live here, none of which knows a model family by name:

- discovery (``find_moe``): the expert weights of a (meta-device) decoder layer, fused or as
  per-expert ``nn.Linear`` modules, the axes their matmul uses, the router and the shared experts;
- (in ``conversion``) the on-disk <-> in-memory mapping (``plan_layer``, ``LayerPlan.to_memory`` / ``to_disk``);
- per-expert (out, in) views for pruning (``ExpertWeight.matrices``) and a routing hook
  (``routing_hook`` / ``record_routing``) for per-expert calibration statistics.

Routing in transformers 5.24 (the router is the MoE block's ``gate``, or ``router`` for gpt-oss; it
returns ``(logits, weights (T, k), indices (T, k))`` and the block calls
``experts(hidden (T, H), indices, weights)``, which is where ``routing_hook`` listens):

- Mixtral: softmax over all E logits (float32), top-k, the k weights renormalised to sum to 1.
- Qwen2-MoE, Qwen3-MoE, OLMoE: the same, renormalised only if ``config.norm_topk_prob`` (default
  False for all three). Qwen2-MoE adds a shared expert scaled by ``sigmoid(shared_expert_gate(x))``.
- DeepSeek-V3: sigmoid scores (float32); experts are chosen on ``scores + e_score_correction_bias``
  within the ``topk_group`` best of ``n_group`` groups (a group scores the sum of its top 2); the
  weights are the unbiased scores of the chosen, renormalised if ``norm_topk_prob`` (default True),
  times ``routed_scaling_factor``. The shared experts are added unweighted.
- gpt-oss: top-k on the logits (router with bias), softmax over the k chosen only.

Per-expert statistics (Wanda/SparseGPT inputs of gate|up, REAP's mean over routed tokens of
``weight * ||expert(x)||``) come from ``routing_hook``'s rows and weights; the down projection's
inputs are ``act(gate) * up`` of those rows, computed through ``ExpertWeight.view``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .errors import LlmpruneError

# --- discovery -----------------------------------------------------------------------------------

GATE, UP = "gate", "up"


@dataclass(frozen=True)
class ExpertMatrix:
    """One expert's matrix, as pruning sees it: a 2-D (out, in) view into its parameter."""
    label: str  # e.g. "mlp.experts.gate_up_proj[3].gate", or "mlp.experts.3.w1.weight"
    param: str  # the layer-relative parameter it lives in
    expert: int
    part: str | None  # GATE or UP for a half of a fused gate|up, else None
    weight: "ExpertWeight" = field(repr=False, compare=False)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """(out, in) view of ``tensor`` (the value of ``param``); writes go through to it."""
        return self.weight.view(tensor, self.expert, self.part)


@dataclass(frozen=True)
class Expert:
    """An expert matrix as a prunable matrix of a model: its name in targets and reports, and the
    in-memory tensor (full name, as the checkpoint's names are prefixed) holding it."""

    name: str  # the checkpoint's per-expert tensor, else e.g. "model.layers.0.mlp.experts.gate_up_proj[3].gate"
    param: str  # e.g. "model.layers.0.mlp.experts.gate_up_proj"
    matrix: ExpertMatrix
    shape: tuple[int, int]  # (out, in)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class ExpertWeight:
    """One kind of expert matrix (e.g. every expert's gate|up) of a MoE block.

    ``fused``: one (E, ., .) parameter ``<container>.<name>``; ``in_dim`` / ``out_dim`` are the axes of
    that 3-D tensor the matmul reads and writes (1, 2 for ``F.linear(x, W[e])``; 2, 1 for
    ``x @ W[e]``). Otherwise each expert is a module ``<container>.<key>`` holding an ``nn.Linear``
    whose 2-D weight is ``name`` (in_dim 1, out_dim 0).
    """

    container: str  # layer-relative path of the experts module, e.g. "mlp.experts"
    name: str  # fused: "gate_up_proj"; per expert: "w1.weight", relative to each expert's module
    num_experts: int
    fused: bool
    in_dim: int
    out_dim: int
    gate_up: str | None = None  # "concatenated": [gate; up] halves of out; "interleaved": gate even, up odd
    bias: str | None = None  # like ``name``: "gate_up_proj_bias" (E, out) when fused, else "w1.bias"
    expert_keys: tuple[str, ...] = ()  # per-expert module names inside the container

    def param(self, expert: int | None = None) -> str:
        """Layer-relative name of the parameter holding ``expert`` (all experts when fused)."""
        if self.fused:
            return f"{self.container}.{self.name}"
        if expert is None:
            raise LlmpruneError(f"{self.container}.*.{self.name}: name an expert")
        return f"{self.container}.{self.expert_keys[expert]}.{self.name}"

    def params(self) -> list[str]:
        return [self.param()] if self.fused else [self.param(e) for e in range(self.num_experts)]

    def bias_params(self) -> list[str]:
        if self.bias is None:
            return []
        if self.fused:
            return [f"{self.container}.{self.bias}"]
        return [f"{self.container}.{k}.{self.bias}" for k in self.expert_keys]

    def view(self, tensor: torch.Tensor, expert: int, part: str | None = None) -> torch.Tensor:
        """Expert ``expert``'s (out, in) matrix (``part`` of a fused gate|up), sharing storage."""
        w = tensor[expert] if self.fused else tensor  # (a, b)
        if self.in_dim < self.out_dim:  # stored (in, out): x @ W[e]
            w = w.t()
        return self._part(w, part)

    def bias_view(self, bias: torch.Tensor, expert: int, part: str | None = None) -> torch.Tensor:
        """Expert ``expert``'s (out,) bias (``part`` of a fused gate|up) from the value of ``bias``."""
        return self._part(bias[expert] if self.fused else bias, part)

    def _part(self, w: torch.Tensor, part: str | None) -> torch.Tensor:
        """Rows of ``w`` (out first) that belong to ``part``."""
        if part is None:
            return w
        if self.gate_up is None or part not in (GATE, UP):
            raise LlmpruneError(f"{self.container}.{self.name} has no {part!r} part")
        if self.gate_up == "interleaved":
            return w[0::2] if part == GATE else w[1::2]
        half = w.shape[0] // 2
        return w[:half] if part == GATE else w[half:]

    def matrices(self, split_gate_up: bool = True) -> list[ExpertMatrix]:
        """Every expert's matrix (gate and up apart, like a dense MLP's, when ``split_gate_up``)."""
        parts = (GATE, UP) if split_gate_up and self.gate_up else (None,)
        out = []
        for e in range(self.num_experts):
            for part in parts:
                if self.fused:
                    label = f"{self.param()}[{e}]" + (f".{part}" if part else "")
                else:
                    label = self.param(e)
                out.append(ExpertMatrix(label, self.param(e), e, part, self))
        return out


@dataclass(frozen=True)
class MoeBlock:
    """A mixture-of-experts block inside a decoder layer (names relative to the layer)."""
    path: str  # e.g. "mlp" (Mixtral's "block_sparse_moe" on disk is "mlp" in memory)
    experts: str  # the experts module, e.g. "mlp.experts"
    num_experts: int
    top_k: int | None
    weights: tuple[ExpertWeight, ...]
    router: str | None  # router module, e.g. "mlp.gate"; never pruned
    router_params: tuple[str, ...]
    shared_experts: tuple[str, ...] = ()  # ordinary MLP modules (the linear rule prunes them)
    shared_gates: tuple[str, ...] = ()  # (1, H) gates of shared experts (an nn.Linear!); never pruned

    def prunable(self) -> list[str]:
        """Parameters holding expert matrices."""
        return [p for w in self.weights for p in w.params()]

    def never_prune(self) -> list[str]:
        """Router and shared-expert gate parameters: exclude them from any linear rule."""
        return [*self.router_params, *self.shared_gates]

    def covered(self) -> list[str]:
        """Everything this block accounts for: expert matrices and biases, router, shared gates."""
        biases = [b for w in self.weights for b in w.bias_params()]
        return [*self.prunable(), *biases, *self.never_prune()]


def find_moe(layer: nn.Module) -> list[MoeBlock]:
    """The MoE blocks of decoder ``layer`` (meta device is fine); [] for a dense layer."""
    blocks = []
    for path, module in layer.named_modules():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            weights = _per_expert_weights(path, module)
        else:
            weights = _fused_weights(path, module)
        if weights:
            blocks.append(_block(layer, path, weights))
    return blocks


def _fused_weights(path: str, module: nn.Module) -> list[ExpertWeight]:
    params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]
    if not params:
        return []
    count = params[0][1].shape[0]
    if any(p.shape[0] != count for _, p in params) or getattr(module, "num_experts", count) != count:
        raise LlmpruneError(f"{path}: 3-D parameters disagree on the number of experts")
    own = dict(module.named_parameters(recurse=False))
    weights = []
    for name, p in params:
        transposed = _transposed(path, module, name, p)
        gate_up = None
        if name.startswith("gate_up"):
            # transformers' experts decorator: [gate; up] halves unless is_concatenated=False (gpt-oss)
            gate_up = "concatenated" if getattr(module, "is_concatenated", True) else "interleaved"
        bias = f"{name}_bias" if f"{name}_bias" in own else None
        weights.append(ExpertWeight(path, name, count, True, 1 if transposed else 2, 2 if transposed else 1,
                                    gate_up, bias))
    return weights


def _transposed(path: str, module: nn.Module, name: str, p: torch.Tensor) -> bool:
    """Whether W[e] is stored (in, out) and used as ``x @ W[e]`` rather than ``F.linear(x, W[e])``."""
    flag = getattr(module, "is_transposed", None)  # set by transformers' @use_experts_implementation
    if flag is not None:
        return bool(flag)
    hidden = getattr(module, "hidden_dim", None) or getattr(module, "hidden_size", None)
    # stored (E, out, in) for F.linear: down_proj writes the hidden size (axis 1), the others read it (axis 2)
    axis = 1 if name.startswith("down") else 2
    if hidden is not None and p.shape[axis] == hidden != p.shape[3 - axis]:
        return False
    if hidden is not None and p.shape[3 - axis] == hidden != p.shape[axis]:
        return True
    raise LlmpruneError(f"cannot tell the input axis of {path}.{name} {tuple(p.shape)} (hidden size {hidden})")


def _per_expert_weights(path: str, module: nn.Module) -> list[ExpertWeight]:
    last = path.rpartition(".")[2].lower()
    children = list(module.named_children())
    if "expert" not in last or "shared" in last or not children:
        return []
    if len({type(child) for _, child in children}) != 1:
        return []
    shapes = [{n: tuple(m.weight.shape) for n, m in child.named_modules() if isinstance(m, nn.Linear)}
              for _, child in children]
    if not shapes[0] or any(s != shapes[0] for s in shapes):
        return []
    first = children[0][1]
    keys = tuple(k for k, _ in children)
    return [ExpertWeight(path, f"{n}.weight", len(keys), False, 1, 0, None,
                         f"{n}.bias" if first.get_submodule(n).bias is not None else None, keys)
            for n in shapes[0]]


def _block(layer: nn.Module, path: str, weights: list[ExpertWeight]) -> MoeBlock:
    count = weights[0].num_experts
    block_path = path.rpartition(".")[0]
    if not block_path:  # experts hang directly off the layer: nothing else to classify
        return MoeBlock("", path, count, None, tuple(weights), None, ())
    block = layer.get_submodule(block_path)
    router, router_params, shared, gates = None, [], [], []
    for name, child in block.named_children():
        full = f"{block_path}.{name}"
        if full == path:
            continue
        matrices = [(n, p) for n, p in child.named_parameters() if p.dim() >= 2]
        if len(matrices) > 1:
            shared.append(full)
        elif matrices and matrices[0][1].shape[0] == count:  # (E, H) logits: the router
            router = full
            router_params += [f"{full}.{n}" for n, _ in child.named_parameters()]
        elif matrices and matrices[0][1].shape[0] == 1:  # (1, H): a shared expert's sigmoid gate
            gates.append(f"{full}.{matrices[0][0]}")
    for n, p in block.named_parameters(recurse=False):
        if p.dim() == 2 and p.shape[0] == count:
            router_params.append(f"{block_path}.{n}")
    top_k = getattr(layer.get_submodule(router), "top_k", None) if router else None
    top_k = top_k or getattr(block, "top_k", None)
    return MoeBlock(block_path, path, count, top_k, tuple(weights), router, tuple(router_params),
                    tuple(shared), tuple(gates))


def uncovered_weights(layer: nn.Module, covered: Iterable[str], min_numel: int = 1) -> list[str]:
    """Floating-point parameters of >= 2 dims of ``layer`` outside ``covered`` (layer-relative names),
    with at least ``min_numel`` elements: weights no rule prunes, for a warning."""
    covered = set(covered)
    return [n for n, p in layer.named_parameters()
            if p.dim() >= 2 and p.is_floating_point() and p.numel() >= min_numel and n not in covered]


# --- routing ------------------------------------------------------------------------------------

OnRouted = Callable[[int, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], None]


@contextmanager
def routing_hook(layer: nn.Module, block: MoeBlock, on_routed: OnRouted, every_expert: bool = False) -> Iterator[None]:
    """Call ``on_routed(expert, rows, weights, tokens)`` for each expert on every forward of
    ``block``'s experts: ``rows`` (n, H) are the hidden states routed to it, ``weights`` (n,) their
    routing weights and ``tokens`` (n,) their positions among the flattened (B*T) tokens. With
    ``every_expert`` (fused experts only) every expert is called with every token (``weights`` and
    ``tokens`` None), while the forward itself still routes as the model does.

    Fused experts (transformers 5) are called as ``experts(hidden (T, H), indices (T, k), weights
    (T, k))``, after the router, so every family's own top-k and normalisation is what is seen.
    Per-expert modules see only their rows: ``weights`` and ``tokens`` are None there.
    """
    experts = layer.get_submodule(block.experts)
    handles = []
    if block.weights[0].fused:
        signature = inspect.signature(experts.forward)  # (hidden_states, top_k_index, top_k_weights)

        def pre(module, args, kwargs):
            hidden, index, weights = list(signature.bind(*args, **kwargs).arguments.values())[:3]
            if every_expert:
                for e in range(block.num_experts):
                    on_routed(e, hidden, None, None)
                return
            for e in index.unique().tolist():
                if 0 <= e < block.num_experts:  # an index of E marks a slot masked out (expert parallelism)
                    tokens, slot = torch.where(index == e)
                    on_routed(e, hidden[tokens], weights[tokens, slot], tokens)

        handles.append(experts.register_forward_pre_hook(pre, with_kwargs=True))
    else:
        for e, key in enumerate(block.weights[0].expert_keys):
            handles.append(experts.get_submodule(key).register_forward_pre_hook(
                lambda module, args, e=e: on_routed(e, args[0].reshape(-1, args[0].shape[-1]), None, None)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def gated_activation(experts: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``act(gate) * up`` as ``experts`` applies it between gate|up and down (the down projection's
    input): gpt-oss's clamped SwiGLU (its ``alpha`` and ``limit``), else the module's ``act_fn``;
    None when the module has neither."""
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if alpha is not None and limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(gate * alpha)
    act = getattr(experts, "act_fn", None)
    return act(gate) * up if act is not None else None


@dataclass
class Routed:
    """What one expert received in one forward."""
    rows: torch.Tensor  # (n, H)
    weights: torch.Tensor | None  # (n,)
    tokens: torch.Tensor | None  # (n,)


@contextmanager
def record_routing(layer: nn.Module, block: MoeBlock) -> Iterator[dict[int, list[Routed]]]:
    """Keep, per expert, what ``routing_hook`` sees (one ``Routed`` per forward); for tests and
    small batches -- accumulate statistics in ``routing_hook``'s callback instead."""
    seen: dict[int, list[Routed]] = {}
    with routing_hook(layer, block, lambda e, rows, w, t: seen.setdefault(e, []).append(Routed(rows, w, t))):
        yield seen
