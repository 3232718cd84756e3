"""Mixture-of-experts layouts on tiny random models of every MoE family transformers builds on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from llmprune.errors import LlmpruneError
from llmprune.conversion import plan_layer
from llmprune.experts import (
    GATE, UP, ExpertWeight, MoeBlock, find_moe, record_routing, uncovered_weights,
)

H, E, K = 32, 4, 2  # hidden size, experts, experts per token
BASE = dict(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, num_experts_per_tok=K)
FAMILIES = {
    "mixtral": dict(BASE, intermediate_size=48, num_local_experts=E),
    "qwen2_moe": dict(BASE, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=E),
    "qwen3_moe": dict(BASE, intermediate_size=40, moe_intermediate_size=24, num_experts=E, head_dim=8),
    "olmoe": dict(BASE, intermediate_size=48, num_experts=E, eos_token_id=2),
    "deepseek_v3": dict(BASE, intermediate_size=40, moe_intermediate_size=24, n_routed_experts=E, n_group=2,
                        topk_group=1, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_oss": dict(BASE, intermediate_size=48, num_local_experts=E, head_dim=8, sliding_window=16),
}
# Read off each family's experts forward (the matmul, the gate|up layout, biases)
F_LINEAR = 2, 1  # F.linear(x, W[e]): W is (E, out, in)
X_MATMUL = 1, 2  # x @ W[e]: W is (E, in, out)


def swiglu(inner: int, layout: str = "concatenated", step=F_LINEAR, biases: bool = False) -> tuple:
    """Expected (name, in_dim, out_dim, gate_up, bias, one expert's (out, in)) of gate|up and down."""
    return (("gate_up_proj", *step, layout, "gate_up_proj_bias" if biases else None, (2 * inner, H)),
            ("down_proj", *step, None, "down_proj_bias" if biases else None, (H, inner)))


EXPECTED = {  # per family, what find_moe must report
    "mixtral": swiglu(48), "qwen2_moe": swiglu(24), "qwen3_moe": swiglu(24), "olmoe": swiglu(48),
            "deepseek_v3": swiglu(24), "gpt_oss": swiglu(48, "interleaved", X_MATMUL, biases=True)}
ROUTER = {"gpt_oss": "mlp.router"}
SHARED = {"qwen2_moe": (("mlp.shared_expert",), ("mlp.shared_expert_gate.weight",)),
          "deepseek_v3": (("mlp.shared_experts",), ())}
# On-disk per-expert names (layer-relative), per part of each fused tensor, as the Hub stores them
DISK = {"mixtral": {"gate_up_proj": ("block_sparse_moe.experts.{}.w1.weight", "block_sparse_moe.experts.{}.w3.weight"),
                    "down_proj": ("block_sparse_moe.experts.{}.w2.weight",)}}
for _family in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"):
    DISK[_family] = {"gate_up_proj": ("mlp.experts.{}.gate_proj.weight", "mlp.experts.{}.up_proj.weight"),
                     "down_proj": ("mlp.experts.{}.down_proj.weight",)}

_built: dict[tuple, Path] = {}


def tiny(family: str, root: Path, dtype=torch.float32, fused_on_disk: bool = False, **overrides) -> Path:
    key = (family, dtype, fused_on_disk, tuple(sorted(overrides.items())))
    if key not in _built:
        torch.manual_seed(0)
        config = AutoConfig.for_model(family, **{**FAMILIES[family], **overrides})
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        folder = root / f"{family}-{str(dtype)[6:]}-{'fused' if fused_on_disk else 'hub'}-{len(_built)}"
        model.save_pretrained(folder, save_original_format=not fused_on_disk)
        _built[key] = folder
    return _built[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe")


def on_disk(folder: Path, index: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return {n: t for n, t in tensors.items() if n.startswith(f"model.layers.{index}.")}


def load(folder: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()


def moe_layers(family: str) -> list[int]:
    return [1] if family == "deepseek_v3" else [0, 1]  # first_k_dense_replace=1


def run_expert(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """The model's own experts module with every row of ``x`` (n, H) routed to expert ``e`` alone."""
    index = torch.full((x.shape[0], 1), e, dtype=torch.long)
    return experts(x, index, torch.ones(x.shape[0], 1, dtype=x.dtype))


def activation(family: str, experts: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated activation each family's experts apply, written out from its modeling code."""
    if family == "gpt_oss":
        gate, up = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    return experts.act_fn(gate) * up


def from_views(family: str, block: MoeBlock, params: dict[str, torch.Tensor], experts: nn.Module,
               x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e`` applied to ``x`` (n, H) through our views only: y = x @ W.T (+ b) per matrix."""
    gate_up, down = block.weights

    def linear(weight: ExpertWeight, inputs: torch.Tensor, part: str | None = None) -> torch.Tensor:
        y = inputs @ weight.view(params[weight.param()], e, part).T
        return y + weight.bias_view(params[weight.bias_params()[0]], e, part) if weight.bias else y

    h = activation(family, experts, linear(gate_up, x, GATE), linear(gate_up, x, UP))  # (n, I)
    return linear(down, h)


# --- discovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_finds_every_expert_tensor_with_its_axes(family):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **FAMILIES[family]))
    for index, layer in enumerate(model.model.layers):
        blocks = find_moe(layer)
        if index not in moe_layers(family):
            assert blocks == []
            continue
        (block,) = blocks
        router = ROUTER.get(family, "mlp.gate")
        shared, gates = SHARED.get(family, ((), ()))
        assert (block.path, block.experts, block.num_experts, block.top_k) == ("mlp", "mlp.experts", E, K)
        assert (block.router, block.shared_experts, block.shared_gates) == (router, shared, gates)
        assert block.router_params == ((f"{router}.weight", f"{router}.bias") if family == "gpt_oss"
                                       else (f"{router}.weight",))
        got = []
        for w in block.weights:
            (m0, *_) = w.matrices(split_gate_up=False)
            shape = tuple(m0.view(layer.get_parameter(w.param())).shape)
            got.append((w.name, w.in_dim, w.out_dim, w.gate_up, w.bias, shape))
            assert w.fused and w.num_experts == E
        assert tuple(got) == EXPECTED[family]
        assert block.prunable() == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        assert not set(block.never_prune()) & set(block.prunable())


def test_expert_matrices_tile_their_parameter_once_with_the_input_last():
    # gpt-oss stores W[e] as (in, out) with gate and up interleaved along out
    w = ExpertWeight("mlp.experts", "gate_up_proj", 2, True, in_dim=1, out_dim=2, gate_up="interleaved")
    t = torch.zeros(2, 3, 8)  # (E, in=3, out=2*4)
    matrices = w.matrices()
    assert [m.label for m in matrices[:2]] == ["mlp.experts.gate_up_proj[0].gate", "mlp.experts.gate_up_proj[0].up"]
    for i, m in enumerate(matrices):
        view = m.view(t)
        assert view.shape == (4, 3)  # (out, in): N:M groups run along the true input
        view += i + 1  # writes land in the parameter
    assert t.min() > 0 and t.sum() == sum((i + 1) * 12 for i in range(4))
    assert t[1, :, 1::2].eq(4).all() and t[0, :, 0::2].eq(1).all()  # expert 1's up = odd columns
    # row-major [gate; up] halves, stored (out, in)
    w = ExpertWeight("mlp.experts", "gate_up_proj", 2, True, in_dim=2, out_dim=1, gate_up="concatenated")
    t = torch.arange(2 * 4 * 3.).reshape(2, 4, 3)
    assert torch.equal(w.view(t, 1, UP), t[1, 2:]) and torch.equal(w.view(t, 1), t[1])


def test_axes_inferred_from_sizes_without_transformers_flags():
    class Experts(nn.Module):  # custom code: no @use_experts_implementation attributes
        def __init__(self, square=False):
            super().__init__()
            self.num_experts, self.hidden_size = 3, 8
            inner = 8 if square else 5
            self.gate_up_proj = nn.Parameter(torch.zeros(3, 8, 2 * inner))  # x @ W[e]
            self.down_proj = nn.Parameter(torch.zeros(3, inner, 8))

    class Block(nn.Module):
        def __init__(self, square=False):
            super().__init__()
            self.router = nn.Linear(8, 3, bias=False)
            self.experts = Experts(square)

    layer = nn.Module()
    layer.mlp = Block()
    (block,) = find_moe(layer)
    assert [(w.in_dim, w.out_dim) for w in block.weights] == [X_MATMUL, X_MATMUL]
    assert block.router_params == ("mlp.router.weight",)
    layer.mlp = Block(square=True)  # down_proj (3, 8, 8): either axis could be the input
    with pytest.raises(LlmpruneError, match="input axis"):
        find_moe(layer)


def test_per_expert_linear_modules_and_their_routing():
    torch.manual_seed(0)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Linear(8, 6, bias=False), nn.Linear(6, 8, bias=True)

        def forward(self, x):
            return self.w2(torch.relu(self.w1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 3, bias=False)
            self.experts = nn.ModuleList(MLP() for _ in range(3))

        def forward(self, x):  # top-1 routing
            choice = self.gate(x).argmax(-1)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                if (choice == e).any():
                    out[choice == e] = expert(x[choice == e])
            return out

    layer = nn.Module()
    layer.block_sparse_moe = Block()
    (block,) = find_moe(layer)
    w1, w2 = block.weights
    assert (w1.name, w1.fused, w1.in_dim, w1.out_dim, w1.num_experts) == ("w1.weight", False, 1, 0, 3)
    assert [m.label for m in w2.matrices()] == [f"block_sparse_moe.experts.{e}.w2.weight" for e in range(3)]
    assert w2.bias_params() == [f"block_sparse_moe.experts.{e}.w2.bias" for e in range(3)]
    assert block.router_params == ("block_sparse_moe.gate.weight",)
    x = torch.randn(20, 8)
    with record_routing(layer, block) as seen:
        layer.block_sparse_moe(x)
    assert sum(r.rows.shape[0] for routed in seen.values() for r in routed) == 20
    assert all(r.weights is None for routed in seen.values() for r in routed)


# --- on disk <-> in memory ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_disk_to_memory_equals_from_pretrained_and_back_is_bit_identical(family, root):
    folder = tiny(family, root)
    config = AutoConfig.from_pretrained(folder)
    model = load(folder)
    state = model.state_dict()
    for index in range(2):
        disk = on_disk(folder, index)
        plan = plan_layer(config, disk)
        memory = plan.to_memory(disk)
        # every tensor of the layer, converted or not, is what from_pretrained holds
        assert set(memory) == {n for n in state if n.startswith(f"model.layers.{index}.")}
        for name, tensor in memory.items():
            assert torch.equal(tensor, state[name]), name
        back = plan.to_disk(memory, like=disk)
        assert set(back) == set(disk)
        for name, tensor in disk.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
        fused = {g.target.rsplit(".", 1)[1]: g for g in plan.groups if g.fused}
        if family == "gpt_oss" or index not in moe_layers(family):
            assert fused == {}  # gpt-oss is fused on disk already; dense layers have no experts
            continue
        prefix = f"model.layers.{index}."
        for name, patterns in DISK[family].items():
            assert fused[name].parts == tuple(tuple(prefix + p.format(e) for e in range(E)) for p in patterns)
            assert fused[name].ops[0] == "MergeModulelist(dim=0)"
        assert fused["gate_up_proj"].ops[1:] == ("Concatenate(dim=1)",)


def test_experts_stack_in_numeric_order_past_ten(root):
    folder = tiny("qwen3_moe", root, num_experts=12)  # "experts.10" sorts before "experts.2" as text
    disk = on_disk(folder, 0)
    plan = plan_layer(AutoConfig.from_pretrained(folder), disk)
    gate_up = plan.group("model.layers.0.mlp.experts.gate_up_proj")
    assert gate_up.parts[0][10] == "model.layers.0.mlp.experts.10.gate_proj.weight"
    memory = plan.to_memory(disk)
    assert torch.equal(memory[gate_up.target], load(folder).state_dict()[gate_up.target])


def test_modified_fused_tensor_splits_into_the_right_on_disk_tensors(root):
    folder = tiny("mixtral", root, dtype=torch.bfloat16)
    disk = on_disk(folder, 1)
    plan = plan_layer(AutoConfig.from_pretrained(folder), disk)
    memory = plan.to_memory(disk)
    (block,) = find_moe(load(folder).model.layers[1])
    gate_up = block.weights[0]
    gate_up.view(memory["model.layers.1.mlp.experts.gate_up_proj"], 2, UP).zero_()
    back = plan.to_disk(memory, like=disk)
    changed = sorted(n for n in disk if not torch.equal(back[n], disk[n]))
    assert changed == ["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    assert back[changed[0]].eq(0).all() and back[changed[0]].dtype == torch.bfloat16
    again = plan.to_memory(back)
    assert all(torch.equal(again[n], memory[n]) for n in memory)


def test_checkpoint_saved_fused_maps_one_to_one(root):
    folder = tiny("mixtral", root, fused_on_disk=True)
    disk = on_disk(folder, 0)
    assert "model.layers.0.mlp.experts.gate_up_proj" in disk
    plan = plan_layer(AutoConfig.from_pretrained(folder), disk)
    assert all(not g.fused and g.sources == (g.target,) for g in plan.groups)
    state = load(folder).state_dict()
    assert all(torch.equal(t, state[n]) for n, t in plan.to_memory(disk).items())


def test_plan_from_the_model_skeleton_matches_the_plan_from_its_config(root):
    folder = tiny("mixtral", root)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    disk = on_disk(folder, 0)
    assert plan_layer(skeleton, disk).groups == plan_layer(config, disk).groups


def test_incomplete_experts_are_refused(root):
    folder = tiny("qwen3_moe", root)
    disk = on_disk(folder, 0)
    del disk["model.layers.0.mlp.experts.3.up_proj.weight"]
    with pytest.raises(LlmpruneError, match="incomplete set of experts"):
        plan_layer(AutoConfig.from_pretrained(folder), disk)


# --- the views are the model's own matmuls; routing ----------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_views_reproduce_the_models_own_expert(family, root):
    model = load(tiny(family, root))
    torch.manual_seed(1)
    x = torch.randn(5, H)
    for index in moe_layers(family):
        layer = model.model.layers[index]
        (block,) = find_moe(layer)
        experts, params = layer.get_submodule(block.experts), dict(layer.named_parameters())
        with torch.no_grad():
            for e in range(E):
                torch.testing.assert_close(from_views(family, block, params, experts, x, e), run_expert(experts, x, e))


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_routing_rebuilds_the_experts_output(family, root):
    model = load(tiny(family, root))
    index = moe_layers(family)[-1]
    layer = model.model.layers[index]
    (block,) = find_moe(layer)
    experts, params = layer.get_submodule(block.experts), dict(layer.named_parameters())
    outputs = []
    handle = experts.register_forward_hook(lambda module, args, out: outputs.append(out))
    torch.manual_seed(2)
    hidden = torch.randn(2, 6, H)  # (B, T, H)
    with torch.no_grad(), record_routing(layer, block) as seen:
        layer.get_submodule(block.path)(hidden)
    handle.remove()
    rebuilt = torch.zeros(12, H)
    slots = torch.zeros(12, dtype=torch.long)
    with torch.no_grad():
        for e, (routed,) in seen.items():
            assert torch.equal(routed.rows, hidden.reshape(-1, H)[routed.tokens])
            out = from_views(family, block, params, experts, routed.rows, e)
            rebuilt.index_add_(0, routed.tokens, routed.weights[:, None] * out)
            slots.index_add_(0, routed.tokens, torch.ones_like(routed.tokens))
    assert slots.eq(K).all()  # every token reached top_k experts
    torch.testing.assert_close(rebuilt, outputs[0])
    if family in ("mixtral", "gpt_oss"):  # renormalised top-k (softmax over the k for gpt-oss)
        total = torch.zeros(12).index_add_(0, torch.cat([r.tokens for (r,) in seen.values()]),
                                           torch.cat([r.weights.float() for (r,) in seen.values()]))
        torch.testing.assert_close(total, torch.ones(12))


# --- what no rule covers ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_uncovered_weights_and_what_is_never_pruned(family, root):
    model = load(tiny(family, root))
    layer = model.model.layers[moe_layers(family)[-1]]
    (block,) = find_moe(layer)
    linears = {f"{n}.weight" for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    never = set(block.never_prune())
    assert never and not never & set(block.prunable())
    # the linear rule alone would prune Qwen2-MoE's (1, H) shared-expert gate: it is an nn.Linear
    assert linears & never == ({"mlp.shared_expert_gate.weight"} if family == "qwen2_moe" else set())
    covered = (linears - never) | set(block.covered())
    assert uncovered_weights(layer, covered) == []
    layer.mlp.mystery = nn.Parameter(torch.zeros(3, H))
    assert uncovered_weights(layer, covered) == ["mlp.mystery"]
    assert uncovered_weights(layer, covered, min_numel=3 * H + 1) == []
