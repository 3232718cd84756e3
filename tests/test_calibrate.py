"""Calibration-aware pruning over the layer stream: Wanda, SparseGPT, true-sequential, OWL."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, run_cli
from llmprune.arch import ModelWithoutLayers
from llmprune.calibrate import collect_stats, input_groups
from llmprune.criteria import sparsegpt, wanda
from llmprune.masks import is_n_m
from llmprune.source import open_source
from llmprune.stream import Activations, layers

def _prune(src, out, *args):
    return run_cli(src, "-o", out, "-q", "--nsamples", "4", "--seqlen", "64", *args)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stream_reproduces_full_model_logits(tiny_models, family):
    """Before pruning, layer-by-layer propagation gives the full model's logits."""
    src = open_source(str(tiny_models[family]))
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    outer = ModelWithoutLayers(src.layout, src.checkpoint.read, torch.device("cpu"))
    acts = Activations(outer, ids, 2, torch.device("cpu"))
    for layer in layers(src.checkpoint, src.layout, torch.device("cpu"), progress=False):
        acts.advance(layer.module(), layer.index)
    got = torch.cat([outer.logits(chunk, h) for chunk, h in zip(ids.split(2), acts.hidden)])
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_saved_activations_load_into_another_chunking(tiny_models, tmp_path):
    """A run resumed on a device that chunks differently regroups the saved states window by window."""
    src = open_source(str(tiny_models["llama"]))
    ids = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    outer = ModelWithoutLayers(src.layout, src.checkpoint.read, torch.device("cpu"))
    saved = Activations(outer, ids, 2, torch.device("cpu"))
    for layer in layers(src.checkpoint, src.layout, torch.device("cpu"), progress=False):
        saved.advance(layer.module(), layer.index)
        break
    Activations.save(saved.snapshot(), tmp_path / "acts")
    other = Activations(outer, ids, 4, tmp_path / "spill")  # chunks of 4 and 1, spilled to disk
    other.load(tmp_path / "acts")
    assert torch.equal(torch.cat([other.chunk(i) for i in range(2)]), torch.cat(saved.hidden))
    fewer = Activations(outer, ids[:4], 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="more windows"):
        fewer.load(tmp_path / "acts")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_calibrated_methods_exact_and_loadable(tiny_with_tokenizer, calib_text, tmp_path, method, pattern):
    out = tmp_path / "out"
    assert _prune(tiny_with_tokenizer, out, "--method", method, "--pattern", pattern, "--sparsity", "0.5",
                  "--calib-data", calib_text) == 0
    recipe = json.loads((out / "llmprune.json").read_text())
    assert recipe["calibration"] == {"data": str(calib_text), "nsamples": 4, "seqlen": 64, "seed": 0}
    weights = load_file(out / "model.safetensors")
    for name in recipe["sparsity"]["matrices"]:
        w = weights[name]
        assert int((w == 0).sum()) == w.numel() // 2, name
        if pattern == "2:4":
            assert is_n_m(w, 2, 4)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.randint(0, 1000, (1, 8))).logits).all()


def test_methods_differ_and_sparsegpt_updates_survivors(tiny_with_tokenizer, calib_text, tmp_path):
    dense = load_file(tiny_with_tokenizer / "model.safetensors")
    masks, values = {}, {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = tmp_path / method
        assert _prune(tiny_with_tokenizer, out, "--method", method, "--sparsity", "0.5", "--calib-data", calib_text) == 0
        w = load_file(out / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
        masks[method], values[method] = w != 0, w
    assert not torch.equal(masks["magnitude"], masks["wanda"])
    d = dense["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(values["wanda"][masks["wanda"]], d[masks["wanda"]])  # wanda keeps survivors
    assert not torch.equal(values["sparsegpt"][masks["sparsegpt"]], d[masks["sparsegpt"]])  # OBS update


@pytest.mark.parametrize("repeat", range(3))
def test_true_sequential_groups_by_shared_input(tiny_models, repeat):
    """q/k/v and gate/up read one tensor each; o and down read their own. Decided by tensor identity,
    not by address: a freed input's memory reused by the next linear's input must not merge them."""
    src = open_source(str(tiny_models["llama"]))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(repeat))
    acts = Activations(ModelWithoutLayers(src.layout, src.checkpoint.read, torch.device("cpu")), ids, 2, torch.device("cpu"))
    layer = next(layers(src.checkpoint, src.layout, torch.device("cpu"), progress=False))
    module = layer.module()
    linears = {name: (lin, module.get_submodule(lin.name)) for lin, name in layer.linears()}
    groups = [[name.split(".")[-2] for name in g] for g in input_groups(module, 0, acts, linears)]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_true_sequential_changes_later_groups_only(tiny_with_tokenizer, calib_text, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ("--method", "wanda", "--sparsity", "0.5", "--calib-data", calib_text)
    assert _prune(tiny_with_tokenizer, a, *args) == 0
    assert _prune(tiny_with_tokenizer, b, *args, "--true-sequential") == 0
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    # layer 0's first group (q/k/v) sees the same inputs either way; its MLP sees pruned attention
    assert torch.equal(wa["model.layers.0.self_attn.q_proj.weight"], wb["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(wa["model.layers.0.mlp.down_proj.weight"], wb["model.layers.0.mlp.down_proj.weight"])


def test_owl_ratios_vary_by_layer_and_keep_the_mean(tiny_with_tokenizer, calib_text, tmp_path):
    out = tmp_path / "owl"
    assert _prune(tiny_with_tokenizer, out, "--method", "magnitude", "--ratios", "owl", "--sparsity", "0.6",
                  "--owl-lambda", "0.1", "--calib-data", calib_text) == 0
    recipe = json.loads((out / "llmprune.json").read_text())
    layers_sp = recipe["sparsity"]["layers"]
    assert max(layers_sp) - min(layers_sp) == pytest.approx(0.2, abs=1e-3)
    assert recipe["sparsity"]["overall"] == pytest.approx(0.6, abs=1e-3)
    assert len(recipe["owl"]["outlier_ratios"]) == 3
    # more outliers -> less sparsity
    order = sorted(range(3), key=lambda i: recipe["owl"]["outlier_ratios"][i])
    assert layers_sp[order[0]] >= layers_sp[order[-1]]


def test_calibration_is_deterministic_for_a_seed(tiny_with_tokenizer, calib_text, tmp_path):
    outs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name
        assert _prune(tiny_with_tokenizer, out, "--method", "sparsegpt", "--sparsity", "0.5", "--seed", seed,
                      "--calib-data", calib_text) == 0
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_owl_refuses_n_m(tiny_models, capsys):
    assert run_cli(tiny_models["llama"], "--pattern", "2:4", "--ratios", "owl", "-q") == 2
    assert "--ratios owl needs unstructured" in capsys.readouterr().err


@pytest.mark.parametrize("criterion", [sparsegpt, wanda])
def test_linears_reading_one_input_share_their_statistics(tiny_models, criterion):
    """q/k/v and gate/up get one statistics object each, equal to what each alone would accumulate."""
    src = open_source(str(tiny_models["llama"]))
    ids = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    outer = ModelWithoutLayers(src.layout, src.checkpoint.read, torch.device("cpu"))
    acts = Activations(outer, ids, 2, torch.device("cpu"))  # three chunks: sharing checked on each
    layer = next(iter(layers(src.checkpoint, src.layout, torch.device("cpu"), progress=False)))
    module = layer.module()
    linears = {name: (lin, module.get_submodule(lin.name)) for lin, name in layer.linears()}
    stats = collect_stats(criterion, module, layer.index, acts, linears)
    short = {name.split(".")[-2]: s for name, s in stats.items()}
    assert short["q_proj"] is short["k_proj"] is short["v_proj"]
    assert short["gate_proj"] is short["up_proj"]
    assert len({id(s) for s in stats.values()}) == 4  # qkv, o, gate/up, down
    # The k projection's own statistics, accumulated separately, are the shared ones.
    k_name = next(n for n in linears if ".k_proj." in n)
    alone = collect_stats(criterion, module, layer.index, acts, {k_name: linears[k_name]})[k_name]
    field = "h" if criterion is sparsegpt else "sum_sq"
    assert torch.equal(getattr(alone, field), getattr(short["k_proj"], field))
    assert alone.tokens == short["k_proj"].tokens == ids.numel()
