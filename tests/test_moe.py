"""Mixture-of-experts checkpoints end to end: every routed expert matrix pruned exactly, routers and
shared-expert gates untouched, the on-disk layout kept, the stream equal to the model."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER_FILES, expect_error, run_cli
from safetensors.torch import load_file, save_file
from test_experts import FAMILIES, load, tiny
from transformers import AutoConfig, AutoModelForCausalLM

from llmprune.arch import ModelWithoutLayers
from llmprune.config import PruneConfig
from llmprune.experts import find_moe, record_routing
from llmprune.perplexity import evaluate
from llmprune.pruning import prune
from llmprune.source import open_source
from llmprune.stream import Activations, layers

MOE = {f: ({"num_key_value_heads": 4} if f == "deepseek_v3" else {}) for f in FAMILIES}  # MLA: one KV head per head
ROUTERS = ("gate.weight", "router.weight", "router.bias", "shared_expert_gate.weight")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def zeros(t: torch.Tensor) -> int:
    return t.numel() - int(torch.count_nonzero(t))


def expert_views(model) -> dict[str, torch.Tensor]:
    """Every expert matrix of a loaded model by its in-memory label, e.g. "model.layers.0.mlp.experts.gate_up_proj[3].gate"."""
    out = {}
    for index, layer in enumerate(model.model.layers):
        for block in find_moe(layer):
            for weight in block.weights:
                for m in weight.matrices():
                    out[f"model.layers.{index}.{m.label}"] = m.view(layer.get_parameter(m.param))
    return out


@pytest.mark.parametrize("family", MOE)
def test_stream_reproduces_the_model_before_pruning(root, family):
    folder = tiny(family, root, **MOE[family])
    src = open_source(str(folder))
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    outer = ModelWithoutLayers(src.layout, src.checkpoint.read, torch.device("cpu"))
    acts = Activations(outer, ids, 2, torch.device("cpu"))
    for layer in layers(src.checkpoint, src.layout, torch.device("cpu"), progress=False):
        acts.advance(layer.module(), layer.index)
    got = torch.cat([outer.logits(chunk, h) for chunk, h in zip(ids.split(2), acts.hidden)])
    with torch.no_grad():
        want = load(folder)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe"])
def test_eval_whole_and_streamed_agree(root, family):
    folder = tiny(family, root, **MOE[family])
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    whole = evaluate(str(folder), windows=windows, stream=False, batch_size=2, progress=False)
    streamed = evaluate(str(folder), windows=windows, stream=True, batch_size=2, progress=False)
    assert (whole.mode, streamed.mode) == ("whole", "streamed")
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-5)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("family", MOE)
def test_every_expert_matrix_pruned_exactly(root, tmp_path, family, pattern):
    folder = tiny(family, root, **MOE[family])
    out = tmp_path / "out"
    assert run_cli(folder, "--sparsity", "0.5", "--pattern", pattern, "-o", out, "-q") == 0
    before, after = tensors(folder), tensors(out)
    assert set(after) == set(before)  # the on-disk layout is kept, per-expert names included
    assert all(after[n].shape == before[n].shape and after[n].dtype == before[n].dtype for n in before)
    report = json.loads((out / "llmprune.json").read_text())["sparsity"]["matrices"]
    model = load(out)
    views = expert_views(model)
    experts = [n for n in report if ".experts." in n]
    assert len(experts) == 3 * 4 * (1 if family == "deepseek_v3" else 2)  # gate, up, down of 4 experts per MoE layer
    for name, line in report.items():
        matrix = after[name] if name in after else views[name]  # (out, in): a checkpoint tensor, or a fused one's part
        assert line["numel"] == matrix.numel() and zeros(matrix) == round(line["achieved"] * matrix.numel())
        assert zeros(matrix) == round(0.5 * matrix.numel()), name
        if pattern == "2:4":
            assert bool(((matrix.reshape(matrix.shape[0], -1, 4) == 0).sum(-1) == 2).all()), name
    for label, view in views.items():  # in memory after from_pretrained: every expert half at 50 %
        assert zeros(view) == view.numel() // 2, label
    for name in before:  # routers, shared-expert gates, norms and biases bit-identical
        if name.endswith(ROUTERS) or before[name].dim() == 1 or name.endswith("_bias"):
            assert torch.equal(after[name], before[name]), name


def test_ratio_rules_reach_each_half_of_a_fused_gate_up(root, tmp_path):
    """A rule on Mixtral's w3 (the up half once fused) prunes exactly that half."""
    folder = tiny("mixtral", root)
    rules = tmp_path / "rules.yaml"
    rules.write_text('"*.w3.weight": 0.25\n"*.self_attn.*": 0.0\n')
    out = tmp_path / "out"
    assert run_cli(folder, "--sparsity", "0.5", "--ratios", rules, "-o", out, "-q") == 0
    after = tensors(out)
    views = expert_views(load(out))
    for index in range(2):
        assert zeros(after[f"model.layers.{index}.self_attn.q_proj.weight"]) == 0
        for e in range(4):
            stem = f"model.layers.{index}.block_sparse_moe.experts.{e}"
            assert zeros(after[f"{stem}.w1.weight"]) == 768 and zeros(after[f"{stem}.w3.weight"]) == 384
            fused = f"model.layers.{index}.mlp.experts.gate_up_proj[{e}]"
            assert zeros(views[f"{fused}.gate"]) == 768 and zeros(views[f"{fused}.up"]) == 384


@pytest.mark.parametrize("family, method", [("mixtral", "wanda"), ("qwen2_moe", "sparsegpt"), ("gpt_oss", "sparsegpt")])
def test_calibrated_methods_prune_experts(root, tmp_path, family, method):
    folder = tiny(family, root, **MOE[family])
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    cfg = PruneConfig(model=str(folder), output=str(tmp_path / "out"), method=method, sparsity=0.5)
    matrices = prune(cfg, progress=False, calib_ids=ids)["sparsity"]["matrices"]
    assert all(line["achieved"] == 0.5 for line in matrices.values()), matrices
    logits = load(tmp_path / "out")(ids).logits
    assert torch.isfinite(logits).all()


def routed_first_layer(root):
    """A tiny Qwen3-MoE, 4 calibration windows, its first layer's module and MoE block, and the rows
    the router sent to each expert of that layer."""
    folder = tiny("qwen3_moe", root)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    src = open_source(str(folder))
    acts = Activations(ModelWithoutLayers(src.layout, src.checkpoint.read, torch.device("cpu")), ids, 4,
                       torch.device("cpu"))
    layer = next(layers(src.checkpoint, src.layout, torch.device("cpu"), progress=False))
    module = layer.module()
    (block,) = find_moe(module)
    with record_routing(module, block) as seen:
        acts.forward(module, 0)
    return folder, ids, module, block, seen


def test_wanda_scores_each_expert_by_its_routed_tokens(root, tmp_path):
    """Layer 0's experts keep what Wanda keeps with the norms of the rows the router sent them."""
    from llmprune.criteria import wanda
    from llmprune.masks import Pattern

    folder, ids, module, block, seen = routed_first_layer(root)
    cfg = PruneConfig(model=str(folder), output=str(tmp_path / "out"), method="wanda", sparsity=0.5)
    prune(cfg, progress=False, calib_ids=ids)
    after = tensors(tmp_path / "out")
    gate_up = block.weights[0]
    for e in range(4):
        rows = torch.cat([r.rows for r in seen[e]])
        stats = wanda.init_stats(torch.empty(1, rows.shape[1]))
        wanda.accumulate(stats, rows)
        weight = gate_up.view(module.get_parameter(gate_up.param()), e, "gate")
        want, _ = wanda.prune(weight, 0.5, Pattern.parse("unstructured"), stats)
        assert torch.equal(after[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"], want), e


def test_moe_calibration_all_scores_every_expert_by_every_token(root, tmp_path):
    """--moe-calibration all: layer 0's experts keep what Wanda keeps with the norms of every token
    entering the experts, not only the routed ones, while the states still follow the routing."""
    from llmprune.criteria import wanda
    from llmprune.masks import Pattern

    folder, ids, module, block, seen = routed_first_layer(root)
    every = torch.cat([torch.cat([r.rows for r in seen[e]]) for e in seen])  # each token k times (top-k)
    out = {}
    for mode in ("routed", "all"):
        cfg = PruneConfig(model=str(folder), output=str(tmp_path / mode), method="wanda", sparsity=0.5,
                          moe_calibration=mode)
        assert prune(cfg, progress=False, calib_ids=ids)["config"]["moe_calibration"] == mode
        out[mode] = tensors(tmp_path / mode)
    gate_up = block.weights[0]
    rows = torch.unique(every, dim=0)  # the distinct hidden states: every token once
    assert rows.shape[0] == 4 * 32
    differ = 0
    for e in range(4):
        stats = wanda.init_stats(torch.empty(1, rows.shape[1]))
        wanda.accumulate(stats, rows)
        weight = gate_up.view(module.get_parameter(gate_up.param()), e, "gate")
        want, _ = wanda.prune(weight, 0.5, Pattern.parse("unstructured"), stats)
        name = f"model.layers.0.mlp.experts.{e}.gate_proj.weight"
        assert torch.equal(out["all"][name], want), e
        differ += not torch.equal(out["all"][name], out["routed"][name])
    assert differ, "statistics from every token chose the same masks as the routed tokens for every expert"


def test_cli_eval_and_wanda_on_a_tokenized_mixtral(tmp_path, calib_text):
    from llmprune.packaged import smollm2_checkpoint

    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", **{**FAMILIES["mixtral"], "vocab_size": 49152})
    folder = tmp_path / "mixtral"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_checkpoint() / name, folder / name)
    for mode in ("--stream", "--no-stream"):
        assert run_cli("eval", folder, "--data", calib_text, "--seqlen", "32", "--max-windows", "2", mode, "-q") == 0
    out = tmp_path / "out"
    assert run_cli(folder, "--method", "wanda", "--pattern", "2:4", "--calib-data", calib_text, "--nsamples", "2",
                   "--seqlen", "32", "-o", out, "-q") == 0
    after = tensors(out)
    for e in range(4):
        w2 = after[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"]  # (32, 48): 2 of every 4 inputs
        assert ((w2.reshape(32, 12, 4) == 0).sum(-1) == 2).all()


def test_uncovered_weight_is_named(tmp_path, monkeypatch, caplog):
    from transformers.models.mixtral import modeling_mixtral

    init = modeling_mixtral.MixtralDecoderLayer.__init__

    def with_extra(self, config, layer_idx):
        init(self, config, layer_idx)
        self.extra_proj = torch.nn.Parameter(torch.randn(8, config.hidden_size))

    monkeypatch.setattr(modeling_mixtral.MixtralDecoderLayer, "__init__", with_extra)
    torch.manual_seed(0)
    folder = tmp_path / "mixtral"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **FAMILIES["mixtral"])).save_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        assert run_cli(folder, "--sparsity", "0.5", "-o", tmp_path / "out", "-q") == 0
    named = [r.getMessage() for r in caplog.records if "model.layers.*.extra_proj" in r.getMessage()]
    assert len(named) == 1, caplog.text
    assert torch.equal(tensors(tmp_path / "out")["model.layers.1.extra_proj"], tensors(folder)["model.layers.1.extra_proj"])


def test_scales_without_quantization_config_refused(root, tmp_path, capsys):
    folder = tmp_path / "fp8"
    shutil.copytree(tiny("mixtral", root), folder)
    state = tensors(folder)
    state["model.layers.0.block_sparse_moe.experts.0.w1.weight_scale_inv"] = torch.ones(1, 1)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    expect_error(capsys, tmp_path, [folder, "--sparsity", "0.5"],
                 "model.layers.0.block_sparse_moe.experts.0.w1.weight_scale_inv: FP8 block-quantized (weight_scale_inv) "
                 "tensors, but config.json declares no quantization_config that reads them")


def test_inspect_lists_expert_matrices(root, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(tiny("gpt_oss", root), "--sparsity", "0.5", "-o", out, "-q") == 0
    capsys.readouterr()
    assert run_cli("inspect", out, "--json", "-q") == 0
    report = json.loads(capsys.readouterr().out)
    rows = {m["name"]: m for m in report["matrices"]}
    assert rows["model.layers.1.mlp.experts.gate_up_proj[3].up"]["shape"] == [48, 32]
    assert rows["model.layers.1.mlp.experts.down_proj[3]"]["zeros"] == 48 * 32 // 2
    assert sum(".experts." in n for n in rows) == 24


@pytest.mark.parametrize("args, message", [
    (["--pattern", "channels", "--sparsity", "0.25"], "not supported on mixture-of-experts models yet"),
    (["--pattern", "layers", "--sparsity", "0.5"], "not supported on mixture-of-experts models yet"),
])
def test_what_would_mishandle_experts_is_refused(root, tmp_path, capsys, args, message):
    """Structured patterns other than experts do not know routed experts yet: one line, exit 2,
    nothing written."""
    expect_error(capsys, tmp_path, [tiny("mixtral", root), *args], message)


def tokenized(family: str, folder: Path, fused_on_disk: bool = False) -> Path:
    """A tiny ``family`` model with SmolLM2's tokenizer (so text can be tokenised for training)."""
    from llmprune.packaged import smollm2_checkpoint

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**MOE[family], **FAMILIES[family], "vocab_size": 49152})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, save_original_format=not fused_on_disk)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_checkpoint() / name, folder / name)
    return folder


@pytest.mark.parametrize("family, fused_on_disk", [("mixtral", False), ("qwen3_moe", False), ("gpt_oss", True)])
def test_whole_finetune_trains_experts_and_keeps_their_zeros(tmp_path, calib_text, family, fused_on_disk):
    src = tokenized(family, tmp_path / "dense", fused_on_disk)
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    assert run_cli(src, "--sparsity", "0.5", "-o", pruned, "-q") == 0
    assert run_cli("finetune", pruned, "-o", tuned, "--mode", "whole", "--steps", "3", "--seqlen", "32",
                   "--batch-size", "2", "--lr", "1e-2", "--data", calib_text, "--device", "cpu", "-q") == 0
    before, after = tensors(pruned), tensors(tuned)
    assert set(after) == set(before)  # the input's on-disk names and layout
    experts = [n for n in before if ".experts." in n and not n.endswith("bias")]  # biases train freely
    assert experts
    for name in experts:
        assert after[name].shape == before[name].shape
        assert torch.equal(after[name] == 0, before[name] == 0), name  # zeros kept, none added
    assert any(not torch.equal(after[n], before[n]) for n in experts)  # the experts trained
    routers = [n for n in before if n.endswith(("gate.weight", "router.weight")) and ".experts." not in n]
    assert routers and all(torch.equal(after[n], before[n]) for n in routers)  # routers stay frozen
    model = AutoModelForCausalLM.from_pretrained(tuned)
    for label, view in expert_views(model).items():
        assert zeros(view) == view.numel() // 2, label
    recipe = json.loads((tuned / "llmprune.json").read_text())
    assert recipe["finetune"]["mode"] == "whole"


@pytest.mark.parametrize("family, fused_on_disk", [("mixtral", False), ("qwen3_moe", False), ("gpt_oss", True)])
def test_blockwise_finetune_trains_experts_and_keeps_their_zeros(tmp_path, calib_text, family, fused_on_disk):
    """Block-wise mode trains each MoE layer towards the dense layer's outputs: every expert matrix
    (fused in memory, per expert or fused on disk) trained with its 2:4 zeros kept, routers frozen,
    the layers' output error lowered."""
    src = tokenized(family, tmp_path / "dense", fused_on_disk)
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    assert run_cli(src, "--pattern", "2:4", "-o", pruned, "-q") == 0
    assert run_cli("finetune", pruned, "-o", tuned, "--mode", "blockwise", "--steps", "4", "--nsamples", "4",
                   "--seqlen", "32", "--batch-size", "2", "--lr", "1e-3", "--data", calib_text, "--device", "cpu",
                   "-q") == 0
    before, after = tensors(pruned), tensors(tuned)
    assert set(after) == set(before)  # the input's on-disk names and layout
    experts = [n for n in before if ".experts." in n and not n.endswith("bias")]
    assert experts
    for name in experts:
        assert after[name].shape == before[name].shape
        assert torch.equal(after[name] == 0, before[name] == 0), name  # zeros kept, none added
    assert any(not torch.equal(after[n], before[n]) for n in experts)  # the experts trained
    routers = [n for n in before if n.endswith(("gate.weight", "router.weight")) and ".experts." not in n]
    assert routers and all(torch.equal(after[n], before[n]) for n in routers)  # routers stay frozen
    recipe = json.loads((tuned / "llmprune.json").read_text())
    assert recipe["finetune"]["mode"] == "blockwise"
    layers_report = recipe["finetune"]["layers"]
    assert any(r["mse_after"] < r["mse_before"] for r in layers_report)
    assert all(r["mse_after"] <= r["mse_before"] for r in layers_report)
    model = AutoModelForCausalLM.from_pretrained(tuned)
    for label, view in expert_views(model).items():
        assert zeros(view) == view.numel() // 2, label


def test_prune_with_finetune_and_expert_removal_then_finetune(tmp_path, calib_text):
    src = tokenized("qwen3_moe", tmp_path / "dense")
    out = tmp_path / "out"
    assert run_cli(src, "--method", "wanda", "--sparsity", "0.5", "--calib-data", calib_text, "--nsamples", "2",
                   "--seqlen", "32", "--finetune-steps", "2", "--finetune-mode", "whole", "--finetune-seqlen", "32",
                   "--finetune-batch-size", "2", "-o", out, "-q") == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(zeros(v) == v.numel() // 2 for v in expert_views(model).values())
    fewer = tmp_path / "fewer"
    assert run_cli(src, "--pattern", "experts", "--sparsity", "0.5", "--calib-data", calib_text, "--nsamples", "2",
                   "--seqlen", "32", "--finetune-steps", "2", "--finetune-mode", "whole", "--finetune-seqlen", "32",
                   "--finetune-batch-size", "2", "-o", fewer, "-q") == 0
    model = AutoModelForCausalLM.from_pretrained(fewer)
    assert model.config.num_experts == AutoConfig.from_pretrained(src).num_experts // 2


def test_sparse_save_of_experts_fused_on_disk_is_refused(root, tmp_path, capsys):
    expect_error(capsys, tmp_path, [tiny("gpt_oss", root), "--pattern", "2:4", "--save-format", "sparse-bitmask"],
                 "cannot store experts fused on disk yet")


def test_owl_sensitivity_and_sweep_reach_the_experts(tmp_path, calib_text):
    src = tokenized("mixtral", tmp_path / "dense")
    calib = ("--calib-data", str(calib_text), "--nsamples", "2", "--seqlen", "32", "-q")
    assert run_cli(src, "--method", "wanda", "--sparsity", "0.7", "--ratios", "owl", *calib, "-o", tmp_path / "owl") == 0
    recipe = json.loads((tmp_path / "owl" / "llmprune.json").read_text())
    experts = {n: m for n, m in recipe["sparsity"]["matrices"].items() if ".experts." in n}
    assert len(experts) == 24 and len(recipe["owl"]["outlier_ratios"]) == 2
    for layer in (0, 1):  # OWL's per-layer ratio reaches that layer's experts as its attention
        ratios = {round(m["target"], 6) for n, m in recipe["sparsity"]["matrices"].items() if f"layers.{layer}." in n}
        assert len(ratios) == 1 and ratios != {0.7}
    assert run_cli("sensitivity", src, "--sparsity", "0.5", "--sparsities", "0.3,0.7", *calib, "-o", tmp_path / "sens") == 0
    rules = tmp_path / "sens" / "ratios.yaml"
    assert run_cli(src, "--sparsity", "0.5", "--ratios", rules, "-o", tmp_path / "ruled", "-q") == 0
    matrices = json.loads((tmp_path / "ruled" / "llmprune.json").read_text())["sparsity"]["matrices"]
    per_layer = [{round(m["target"], 6) for n, m in matrices.items() if f"layers.{i}." in n and ".experts." in n}
                 for i in (0, 1)]
    assert all(len(r) == 1 for r in per_layer) and per_layer[0] != per_layer[1]  # the file's ratios, experts included
    assert run_cli("sweep", src, "--sparsities", "0.5", "--methods", "magnitude,wanda", "--eval", calib_text,
                   "--eval-seqlen", "32", "--eval-max-windows", "2", *calib, "-o", tmp_path / "sweep") == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert "wanda" in json.dumps(rows) and "magnitude" in json.dumps(rows)
