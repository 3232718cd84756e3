"""``--pattern experts``: remove a share of the routed experts of every mixture-of-experts layer, so
the output is an ordinary smaller checkpoint (fewer experts in the config, the router's rows gone).

transformers' configs hold one expert count for all layers, so the same number goes in every MoE
layer and the output's shapes are known before any layer is scored. Which experts go is decided per
layer as the engine streams it, from the calibration states entering the layer:

- ``reap`` (Lasby et al. 2025, "REAP the Experts"): the mean, over the tokens the router sends to
  the expert, of routing weight x ||expert output||_2: an expert that is rarely chosen, weighted
  little, or outputs little contributes little to the layer's output;
- ``frequency``: how many tokens the router sends to the expert.

The lowest-scoring experts go; the states then advance through the layer as the output builds it
(the kept experts only: what the input computes with the removed experts' router logits at minus
infinity), so later layers are ranked on what the output model sees. Dense layers (DeepSeek's first
layers, Qwen2-MoE's ``mlp_only_layers``) pass through unchanged.

On disk, experts stored one tensor per expert (``experts.7.w1.weight``) keep that layout, renumbered
0..kept-1 in their order; tensors whose first axis runs over experts (fused experts, the router's
weight rows and bias, DeepSeek's ``e_score_correction_bias``) keep the rows of the kept experts.
Shared experts, their gates, attention and norms are untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from . import masks
from .arch import Layout, materialize
from .checkpoint import TensorSpec
from .errors import LlmpruneError
from .experts import MoeBlock, routing_hook
from .stream import Activations, Layer

log = logging.getLogger(__name__)

SCORES = {"reap": "REAP: mean routing weight x ||expert output|| over the tokens routed to the expert",
          "frequency": "number of calibration tokens routed to the expert"}
# Config attributes holding the routed expert count (transformers' names across families; an
# attribute_map alias such as DeepSeek's num_local_experts -> n_routed_experts is written once)
COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k")
STACKED = -1  # a checkpoint tensor whose first axis runs over the experts


@dataclass(frozen=True)
class ExpertTensors:
    """Where one MoE layer's routed experts live, in memory and on disk."""
    block: MoeBlock
    memory: tuple[str, ...]  # layer-relative in-memory tensors whose first axis runs over the experts
    stacked: tuple[str, ...]  # checkpoint tensors whose first axis runs over the experts
    per_expert: tuple[tuple[str, ...], ...]  # checkpoint tensors holding one expert each: per part, in expert order

    @cached_property
    def where(self) -> dict[str, tuple[int, int]]:
        """Checkpoint name -> (STACKED, 0), or (part, expert) for a per-expert tensor."""
        out = {name: (STACKED, 0) for name in self.stacked}
        for p, names in enumerate(self.per_expert):
            out.update((name, (p, e)) for e, name in enumerate(names))
        return out


def expert_tensors(layout: Layout, index: int) -> ExpertTensors | None:
    """The routed experts of decoder layer ``index`` (None for a dense layer); refuses layouts whose
    experts cannot be removed as a whole (several MoE blocks, experts as separate modules, a router
    tensor without an expert axis first)."""
    blocks = layout.moe[index] if layout.moe else []
    if not blocks:
        return None
    here = f"layer {index}"
    if len(blocks) > 1:
        raise LlmpruneError(f"--pattern experts: {here} has {len(blocks)} mixture-of-experts blocks; one is supported")
    block = blocks[0]
    if not all(w.fused for w in block.weights):
        raise LlmpruneError(f"--pattern experts: the experts of {here} are separate modules ({block.experts}.N); "
                            "only experts fused into (experts, ., .) parameters, as transformers 5 builds them, "
                            "are supported")
    if block.router is None:
        raise LlmpruneError(f"--pattern experts: no router found beside {block.experts} in {here}")
    layer, count = layout.layer_module(index), block.num_experts
    memory: list[str] = []
    for owner in (block.experts, block.router):
        for name, t in layer.get_submodule(owner).state_dict().items():  # parameters and persistent buffers
            if t.dim() == 0 or t.shape[0] != count:
                raise LlmpruneError(f"--pattern experts: {owner}.{name} {tuple(t.shape)} in {here} does not run over "
                                    f"the {count} experts along its first axis; cannot remove experts from it")
            memory.append(f"{owner}.{name}")
    memory += [p for p in block.router_params if p not in memory]  # router weights held by the block itself
    prefix = layout.checkpoint_name(layout.layer_prefix(index))
    plan = layout.plan(index)
    stacked, per_expert = [], []
    for name in memory:
        full = prefix + name
        group = plan.group(full) if plan is not None and full in plan.targets else None
        if group is not None and group.fused:
            if any(len(part) != count for part in group.parts):
                raise LlmpruneError(f"--pattern experts: {full} is stored as {[len(p) for p in group.parts]} tensors, "
                                    f"not one per expert ({count})")
            per_expert += group.parts
        else:
            stacked.append(layout.stored_name(index, full))
    return ExpertTensors(block, tuple(memory), tuple(stacked), tuple(per_expert))


@dataclass(frozen=True)
class ExpertPlan:
    """What removing experts changes in the config: the count keys, kept per layer, the groups."""
    count: int  # experts per MoE layer in the input
    remove: int
    groups: int  # grouped routing (DeepSeek's n_group): the same number goes from each group
    values: dict[str, int]  # config attributes of the output
    top_k: int | None

    @property
    def kept(self) -> int:
        return self.count - self.remove


def plan_counts(layout: Layout, tensors: list[ExpertTensors | None], ratio: float) -> ExpertPlan:
    """How many experts go from each MoE layer at ``ratio`` and the config values that say so;
    refuses a non-MoE model, fewer kept experts than the router picks, and grouped routing that
    could not stay valid."""
    moe = [t for t in tensors if t is not None]
    if not moe:
        raise LlmpruneError("--pattern experts needs a mixture-of-experts model: this one has no routed experts")
    counts = {t.block.num_experts for t in moe}
    if len(counts) != 1:
        raise LlmpruneError(f"--pattern experts: MoE layers differ in their number of experts ({sorted(counts)})")
    count = counts.pop()
    remove = masks.prune_count(count, ratio)
    if remove == 0:
        raise LlmpruneError(f"--sparsity {ratio} removes none of the {count} experts per layer: "
                            f"the smallest ratio that removes one is {0.5 / count:.4g}")
    if remove >= count:
        raise LlmpruneError(f"--sparsity {ratio} would remove all {count} experts of each MoE layer")
    text = layout.config.get_text_config()
    top_k = next((t.block.top_k for t in moe if t.block.top_k), None)
    top_k = top_k or next((getattr(text, k) for k in TOP_K_KEYS if isinstance(getattr(text, k, None), int)), None)
    kept = count - remove
    if top_k is not None and kept < top_k:
        raise LlmpruneError(f"--sparsity {ratio} keeps {kept} of {count} experts per layer, fewer than the {top_k} "
                            f"the router picks for each token; at most {(count - top_k + 0.5) / count:.4g} keeps {top_k}")
    groups = getattr(text, "n_group", None) or 1
    if groups > 1:
        check_groups(count, remove, groups, getattr(text, "topk_group", None) or groups, top_k)
    aliases = getattr(type(text), "attribute_map", {}) or {}
    keys = {aliases.get(k, k) for k in COUNT_KEYS if getattr(text, k, None) == count}  # one per config.json key
    if not keys:
        raise LlmpruneError(f"--pattern experts: {type(text).__name__} has none of {', '.join(COUNT_KEYS)} equal to "
                            f"the {count} experts per layer; cannot write the smaller count")
    return ExpertPlan(count, remove, groups, {k: kept for k in sorted(keys)}, top_k)


def check_groups(count: int, remove: int, groups: int, topk_group: int, top_k: int | None) -> None:
    """Grouped routing (DeepSeek-V3: experts in ``groups`` equal groups, a group scored by its best two,
    the ``topk_group`` best groups eligible) stays valid when each group loses as many experts, keeps
    two, and the eligible groups still hold ``top_k``."""
    what = f"grouped routing (n_group={groups}, topk_group={topk_group})"
    if count % groups:
        raise LlmpruneError(f"--pattern experts: {count} experts do not split into {what}")
    if remove % groups:
        raise LlmpruneError(f"--pattern experts with {what} removes the same number from each group: "
                            f"{remove} of {count} experts is not a multiple of {groups}")
    per_group = (count - remove) // groups
    if per_group < 2:
        raise LlmpruneError(f"--pattern experts with {what} must keep at least 2 experts per group (a group is "
                            f"scored by its best two); removing {remove} of {count} keeps {per_group}")
    if top_k is not None and per_group * topk_group < top_k:
        raise LlmpruneError(f"--pattern experts with {what}: {topk_group} groups of {per_group} kept experts hold "
                            f"fewer than the {top_k} the router picks")


def output_spec(info: ExpertTensors, kept: int, spec: TensorSpec) -> TensorSpec | None:
    """The output spec of a checkpoint tensor of a MoE layer keeping ``kept`` experts; None when dropped."""
    part, expert = info.where.get(spec.name, (None, 0))
    if part is None:
        return spec
    if part == STACKED:
        return TensorSpec(spec.name, spec.dtype, (kept, *spec.shape[1:]))
    return spec if expert < kept else None


@torch.no_grad()
def expert_scores(module: nn.Module, block: MoeBlock, acts: Activations, index: int, score: str) -> torch.Tensor:
    """(experts,) float64: each expert's ``score`` on the calibration states entering layer ``index``."""
    experts = module.get_submodule(block.experts)
    weighted = torch.zeros(block.num_experts, dtype=torch.float64)
    tokens = torch.zeros(block.num_experts, dtype=torch.float64)
    busy = [False]  # the expert forward below passes the same hook: ignore it there

    def on_routed(e: int, rows: torch.Tensor, weights: torch.Tensor | None, _positions) -> None:
        if busy[0]:
            return
        tokens[e] += rows.shape[0]
        if score != "reap":
            return
        busy[0] = True
        try:  # expert e alone, weight 1: the family's own experts forward, (n, H)
            out = experts(rows, torch.full((rows.shape[0], 1), e, dtype=torch.long, device=rows.device),
                          torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device))
        finally:
            busy[0] = False
        weighted[e] += float((weights.float() * out.float().norm(dim=-1)).sum(dtype=torch.float64))

    with routing_hook(module, block, on_routed):
        acts.forward(module, index)
    if score == "frequency":
        return tokens
    return torch.where(tokens > 0, weighted / tokens.clamp(min=1), torch.zeros_like(weighted))


def choose(scores: torch.Tensor, remove: int, groups: int) -> list[int]:
    """The ``remove`` lowest-scoring experts, the same number from each of ``groups`` equal groups."""
    keep = masks.units(scores.view(groups, -1), remove // groups).reshape(-1)
    return torch.nonzero(~keep).squeeze(1).tolist()


@dataclass
class ExpertStep:
    """Engine step for ``experts``: score each MoE layer's experts, remove the lowest, advance the
    calibration states through the layer the output holds."""

    layout: Layout
    tensors: list[ExpertTensors | None]
    plan: ExpertPlan
    shrunk: nn.ModuleList  # the output's decoder layers (meta device), for advancing the states
    acts: Activations
    score: str = "reap"
    removed: dict[int, list[int]] = field(default_factory=dict)
    scores: dict[int, list[float]] = field(default_factory=dict)
    zeros: dict[str, int] = field(default_factory=dict)  # elements removed per prunable matrix

    def layer_state(self, index: int) -> dict | None:
        """What a resumed run needs of layer ``index``: the experts removed there and their scores."""
        if index not in self.removed:
            return None
        return {"removed": self.removed[index], "scores": self.scores[index]}

    def restore_layer_state(self, index: int, state: dict | None) -> None:
        if state is not None:
            self.removed[index], self.scores[index] = state["removed"], state["scores"]

    def spec(self, index: int, spec: TensorSpec) -> TensorSpec | None:
        info = self.tensors[index]
        return spec if info is None else output_spec(info, self.plan.kept, spec)

    @torch.no_grad()
    def __call__(self, layer: Layer) -> dict[str, torch.Tensor]:
        info = self.tensors[layer.index]
        for _, name in layer.linears():
            self.zeros[name] = 0
        if info is None:
            self.acts.advance(layer.module(), layer.index)
            return layer.tensors
        module = layer.module()  # shares storage with layer.tensors and layer.fused
        scores = expert_scores(module, info.block, self.acts, layer.index, self.score)
        removed = choose(scores, self.plan.remove, self.plan.groups)
        kept = [e for e in range(self.plan.count) if e not in removed]
        self.removed[layer.index], self.scores[layer.index] = removed, [float(s) for s in scores]
        for expert in self.layout.expert_matrices(layer.index):
            self.zeros[expert.name] = expert.numel if expert.matrix.expert in removed else 0
        rows = torch.tensor(kept, dtype=torch.long)
        state = module.state_dict()
        for name in info.memory:
            state[name] = state[name].index_select(0, rows.to(state[name].device))
        self.acts.advance(materialize(self.shrunk[layer.index], state), layer.index)
        return self.on_disk(layer, info, kept, rows)

    @staticmethod
    def on_disk(layer: Layer, info: ExpertTensors, kept: list[int], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's checkpoint tensors without the removed experts: per-expert tensors renumbered
        0..kept-1 in order, stacked ones cut to the kept rows."""
        disk = dict(layer.tensors)
        plan = layer.layout.plan(layer.index)
        if layer.fused:  # split back into the checkpoint's per-expert tensors; the layer writes them no more
            disk.update(plan.to_disk(layer.fused))
            layer.fused.clear()
        out = {name: t for name, t in disk.items() if name not in info.where}
        for name in info.stacked:
            out[name] = disk[name].index_select(0, rows.to(disk[name].device))
        for names in info.per_expert:
            out.update((names[new], disk[names[old]]) for new, old in enumerate(kept))
        return out
