"""End to end through the CLI on tiny checkpoints of every supported family."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, build_tiny, run_cli, tree_hash
from llmprune.masks import is_n_m


def load_all(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def out_in(name, tensor, family):
    """GPT-2's Conv1D stores (in, out); compare masks along the true input dimension."""
    return tensor.t() if family == "gpt2" and tensor.dim() == 2 and not name.endswith("wte.weight") \
        and not name.endswith("wpe.weight") else tensor


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_family_prunes_reloads_and_keeps_survivors(tiny_models, tmp_path, family, pattern):
    src = tiny_models[family]
    before = tree_hash(src)
    out = tmp_path / "out"
    assert run_cli(src, "--sparsity", "0.5", "--pattern", pattern, "-o", out, "-q", "--max-shard-size", "60KB") == 0
    assert tree_hash(src) == before, "the input checkpoint was modified"

    recipe = json.loads((out / "llmprune.json").read_text())
    pruned = recipe["sparsity"]["matrices"]
    assert pruned and recipe["sparsity"]["overall"] == 0.5
    a, b = load_all(src), load_all(out)
    assert a.keys() == b.keys()
    for name, dense in a.items():
        if name in pruned:
            sparse = b[name]
            assert int((sparse == 0).sum()) == round(0.5 * dense.numel())
            survivors = sparse != 0
            assert torch.equal(sparse[survivors], dense[survivors])
            if pattern == "2:4":
                assert is_n_m(out_in(name, sparse, family), 2, 4)
        else:
            assert torch.equal(a[name], b[name]), f"{name} changed"
    # every decoder-layer linear of the family was found
    layers = AutoModelForCausalLM.from_pretrained(src).config.num_hidden_layers
    assert len({n.split(".layers.")[-1].split(".h.")[-1].split(".")[0] for n in pruned}) == layers

    model = AutoModelForCausalLM.from_pretrained(out)
    for name, t in model.state_dict().items():
        key = name if name in b else name.removeprefix("transformer.")
        if key in pruned:
            assert torch.equal(t, b[key])
    assert torch.isfinite(model(torch.randint(0, 100, (1, 8))).logits).all()
    assert (out / "model.safetensors.index.json").exists()
    assert {"README.md", "config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}


def test_gpt2_groups_follow_the_true_input_dimension(tiny_models, tmp_path):
    out = tmp_path / "out"
    assert run_cli(tiny_models["gpt2"], "--pattern", "2:4", "-o", out, "-q") == 0
    w = load_all(out)["transformer.h.0.mlp.c_fc.weight"]  # Conv1D: (in=64, out=256)
    assert w.shape == (64, 256)
    assert is_n_m(w.t(), 2, 4)
    assert not is_n_m(w, 2, 4)  # stored rows are input features: groups must not run along them


def test_tied_embeddings_stay_tied(tmp_path):
    src = build_tiny("llama", tmp_path / "tied", tie_word_embeddings=True)
    out = tmp_path / "out"
    assert run_cli(src, "--sparsity", "0.5", "-o", out, "-q") == 0
    assert "lm_head.weight" not in load_all(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sharded_bf16_input_and_dtype_conversion(tmp_path):
    src = build_tiny("llama", tmp_path / "bf16", dtype=torch.bfloat16, shard="20KB")
    assert len(list(src.glob("*.safetensors"))) > 2
    out = tmp_path / "out"
    assert run_cli(src, "--sparsity", "0.3", "-o", out, "-q") == 0
    assert all(t.dtype == torch.bfloat16 for t in load_all(out).values())
    out32 = tmp_path / "out32"
    assert run_cli(src, "--sparsity", "0.3", "-o", out32, "-q", "--dtype", "float32") == 0
    tensors = load_all(out32)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"
    assert AutoModelForCausalLM.from_pretrained(out32).dtype == torch.float32


def test_schedule_and_rules(tiny_models, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text('"*.o_proj.weight": 0.0\n')
    out = tmp_path / "out"
    assert run_cli(tiny_models["llama"], "--sparsity", "0.5", "--schedule", "linear:0.2", "--ratios", rules,
                   "-o", out, "-q") == 0
    recipe = json.loads((out / "llmprune.json").read_text())
    m = recipe["sparsity"]["matrices"]
    assert all(v["achieved"] == 0 for k, v in m.items() if k.endswith("o_proj.weight"))
    down = [m[f"model.layers.{i}.mlp.down_proj.weight"]["achieved"] for i in range(3)]
    assert down[0] < down[1] < down[2]
    scheduled = [v for k, v in m.items() if not k.endswith("o_proj.weight")]
    mean = sum(v["achieved"] * v["numel"] for v in scheduled) / sum(v["numel"] for v in scheduled)
    assert abs(mean - 0.5) < 1e-3
    assert recipe["config"]["schedule"] == "linear:0.2"
    assert recipe["versions"]["torch"] == torch.__version__
    assert recipe["input"]["shards"]


def test_existing_output_refused_then_overwritten(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli(tiny_models["llama"], "--sparsity", "0.5", "-o", out, "-q") == 2
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli(tiny_models["llama"], "--sparsity", "0.5", "-o", out, "-q", "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "llmprune.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind


def test_model_card_parses(tiny_models, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    assert run_cli(tiny_models["qwen2"], "--pattern", "4:8", "-o", out, "-q") == 0
    card = ModelCard.load(out / "README.md")
    assert {"pruned", "sparse", "llmprune"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert "4:8" in card.text and "llmprune" in card.text and "--pattern 4:8" in card.text


def test_eval_measures_input_and_output_on_the_same_windows(tiny_with_tokenizer, calib_text, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from llmprune.perplexity import evaluate, load_windows

    out = tmp_path / "out"
    capsys.readouterr()
    assert run_cli(tiny_with_tokenizer, "--sparsity", "0.5", "-o", out, "--eval", calib_text, "--eval-seqlen", "32",
                   "--eval-max-windows", "3") == 0
    summary = capsys.readouterr().out
    ev = json.loads((out / "llmprune.json").read_text())["eval"]
    assert ev["windows"] == 3 and ev["seqlen"] == 32
    windows = load_windows(str(tiny_with_tokenizer), str(calib_text), 32, 3)
    dense = evaluate(str(tiny_with_tokenizer), windows=windows, progress=False).perplexity
    pruned = evaluate(str(out), windows=windows, progress=False).perplexity
    assert ev["dense"]["perplexity"] == pytest.approx(dense, rel=1e-6)
    assert ev["pruned"]["perplexity"] == pytest.approx(pruned, rel=1e-6)
    assert ev["ratio"] == pytest.approx(pruned / dense, rel=1e-6)
    assert f"{dense:.3f} dense -> {pruned:.3f} pruned" in summary
    assert f"| pruned (this model) | {pruned:.3f} |" in ModelCard.load(out / "README.md").text
