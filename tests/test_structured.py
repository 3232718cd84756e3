"""Structured pruning: the output is a smaller dense model equal to the input with the units zeroed."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TOKENIZER_FILES, build_tiny, run_cli, tree_hash
from llmprune import masks
from conftest import expect_error

# Per family: MLP readers and writer, attention q/k/v and output (names inside a decoder layer).
NAMES = {
    "llama": (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj", "self_attn.o_proj"),
    "mistral": (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj", "self_attn.o_proj"),
    "qwen2": (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj", "self_attn.o_proj"),
    "opt": (["fc1"], "fc2", "self_attn.out_proj"),
}
CALIB = ("--nsamples", "4", "--seqlen", "32")


def decoder_layers(model):
    return model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def matches(original: torch.Tensor, pruned: torch.Tensor, width: int) -> list[int]:
    """Which blocks of ``width`` rows of ``original`` the rows of ``pruned`` are, in order."""
    blocks = original.view(-1, width, *original.shape[1:])
    found = []
    for block in pruned.view(-1, width, *pruned.shape[1:]):
        hits = [i for i, b in enumerate(blocks) if torch.equal(b, block)]
        assert len(hits) == 1, "a pruned row is not a row of the input"
        found.append(hits[0])
    return found


def zero_units(layer, readers: list[str], writer: str, removed: list[int], width: int) -> None:
    """Zero, in place, the reader rows and writer columns of units ``removed`` (``width`` each)."""
    with torch.no_grad():
        for unit in removed:
            rows = slice(unit * width, (unit + 1) * width)
            for name in readers:
                lin = layer.get_submodule(name)
                lin.weight[rows] = 0
                if lin.bias is not None:
                    lin.bias[rows] = 0
            layer.get_submodule(writer).weight[:, rows] = 0


def same_logits(reference, folder) -> None:
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, load(folder)(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(NAMES))
def test_channels_equal_the_model_with_channels_zeroed(tiny_models, tmp_path, family):
    src, out = tiny_models[family], tmp_path / "out"
    before = tree_hash(src)
    assert run_cli(src, "--pattern", "channels", "--sparsity", "0.25", "-o", out, "-q", "--max-shard-size", "30KB") == 0
    assert tree_hash(src) == before
    config = json.loads((out / "config.json").read_text())
    key = "ffn_dim" if family == "opt" else "intermediate_size"
    assert config[key] == 96 and config["num_hidden_layers"] == 3
    reference, pruned = load(src), load(out)
    readers, writer, _ = NAMES[family]
    for ref_layer, layer in zip(decoder_layers(reference), decoder_layers(pruned)):
        for name in readers:
            assert layer.get_submodule(name).weight.shape == (96, 64)
        assert layer.get_submodule(writer).weight.shape == (64, 96)
        kept = matches(ref_layer.get_submodule(readers[0]).weight, layer.get_submodule(readers[0]).weight, 1)
        assert kept == sorted(kept) and len(kept) == 96
        # the writer's columns follow the readers' rows
        assert torch.equal(layer.get_submodule(writer).weight, ref_layer.get_submodule(writer).weight[:, kept])
        zero_units(ref_layer, readers, writer, sorted(set(range(128)) - set(kept)), 1)
    same_logits(reference, out)
    recipe = json.loads((out / "llmprune.json").read_text())
    assert recipe["structured"]["config"][key] == {"before": 128, "after": 96}
    params = sum(p.numel() for p in pruned.parameters())
    assert recipe["structured"]["parameters"]["after"] == params
    assert recipe["structured"]["parameters"]["before"] - params == 3 * 32 * 64 * (len(readers) + 1) + \
        (3 * 32 if family == "opt" else 0)  # OPT's fc1 has a bias


def test_channels_removed_are_the_lowest_l1_norms(tiny_models, tmp_path):
    out = tmp_path / "out"
    assert run_cli(tiny_models["llama"], "--pattern", "channels", "--sparsity", "0.5", "-o", out, "-q") == 0
    reference, pruned = load(tiny_models["llama"]), load(out)
    for ref_layer, layer in zip(decoder_layers(reference), decoder_layers(pruned)):
        mlp = ref_layer.mlp
        norms = mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1) + mlp.down_proj.weight.abs().sum(0)
        kept = matches(mlp.up_proj.weight, layer.mlp.up_proj.weight, 1)
        assert kept == sorted(torch.argsort(norms, descending=True)[:64].tolist())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("pattern,heads,kv_heads", [("heads", 2, 2), ("kv-heads", 2, 1)])
def test_heads_equal_the_model_with_heads_zeroed(tiny_models, tmp_path, family, pattern, heads, kv_heads):
    src, out = tiny_models[family], tmp_path / "out"
    assert run_cli(src, "--pattern", pattern, "--sparsity", "0.5", "--norm", "l2", "-o", out, "-q") == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (heads, kv_heads, 16)
    recipe = json.loads((out / "llmprune.json").read_text())
    reference, pruned = load(src), load(out)
    for i, (ref_layer, layer) in enumerate(zip(decoder_layers(reference), decoder_layers(pruned))):
        attn, ref = layer.self_attn, ref_layer.self_attn
        assert attn.q_proj.weight.shape == (heads * 16, 64) and attn.k_proj.weight.shape == (kv_heads * 16, 64)
        assert attn.o_proj.weight.shape == (64, heads * 16)
        kept_q = matches(ref.q_proj.weight, attn.q_proj.weight, 16)
        kept_kv = matches(ref.k_proj.weight, attn.k_proj.weight, 16)
        assert [h // 2 for h in kept_q] == [g for g in kept_kv for _ in range(heads // kv_heads)], \
            "query heads left their KV group"
        removed_q = sorted(set(range(4)) - set(kept_q))
        units = removed_q if pattern == "heads" else sorted(set(range(2)) - set(kept_kv))
        assert recipe["structured"]["removed"][str(i)] == units
        if pattern == "heads":  # one head per group goes: the lower l2 norm of q rows and o columns
            norms = (ref.q_proj.weight.view(4, -1).square().sum(1) + ref.o_proj.weight.t().reshape(4, -1).square().sum(1))
            assert removed_q == [g * 2 + int(norms[g * 2 + 1] < norms[g * 2]) for g in range(2)]
        zero_units(ref_layer, ["self_attn.q_proj"], "self_attn.o_proj", removed_q, 16)
    same_logits(reference, out)


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory, tiny_with_tokenizer):
    """Tiny models of each family that share SmolLM2's tokenizer, for calibration."""
    root = tmp_path_factory.mktemp("tokenized")
    folders = {"llama": tiny_with_tokenizer}
    for family in ("mistral", "qwen2", "opt"):
        folders[family] = build_tiny(family, root / family, vocab_size=49152, tie_word_embeddings=True, shard="100MB")
        for name in TOKENIZER_FILES:
            shutil.copy(tiny_with_tokenizer / name, folders[family] / name)
    return folders


@pytest.mark.parametrize("family", list(NAMES))
def test_layers_equal_the_model_with_layers_bypassed(tokenized, calib_text, tmp_path, family):
    src, out = tokenized[family], tmp_path / "out"
    assert run_cli(src, "--pattern", "layers", "--sparsity", "0.34", "-o", out, "-q", "--calib-data", calib_text,
                   *CALIB) == 0
    st = json.loads((out / "llmprune.json").read_text())["structured"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    (dropped,) = st["removed"]
    assert dropped == min(range(3), key=lambda i: st["block_influence"][i])
    reference, pruned = load(src), load(out)
    kept = [i for i in range(3) if i != dropped]
    for new, old in enumerate(kept):  # renumbered: layer `new` of the output is layer `old` of the input
        a, b = decoder_layers(pruned)[new].state_dict(), decoder_layers(reference)[old].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    readers, writer, attn_out = NAMES[family]
    with torch.no_grad():  # a pre-norm layer whose output projections are zero is the identity
        for name in (writer, attn_out):
            lin = decoder_layers(reference)[dropped].get_submodule(name)
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    same_logits(reference, out)


def calibration_windows(folder, calib_text):
    from llmprune.data import calibration_samples

    return calibration_samples(AutoTokenizer.from_pretrained(folder), str(calib_text), 4, 32, 0)


def test_block_influence_is_one_minus_mean_cosine(tokenized, calib_text, tmp_path):
    out = tmp_path / "out"
    assert run_cli(tokenized["llama"], "--pattern", "layers", "--sparsity", "0.34", "-o", out, "-q",
                   "--calib-data", calib_text, *CALIB) == 0
    st = json.loads((out / "llmprune.json").read_text())["structured"]
    model, seen = load(tokenized["llama"]), []
    hooks = [layer.register_forward_hook(lambda m, args, kwargs, output: seen.append((kwargs.get("hidden_states", args[0] if args else None), output)), with_kwargs=True)
             for layer in decoder_layers(model)]
    with torch.no_grad():
        model(calibration_windows(tokenized["llama"], calib_text))
    for h in hooks:
        h.remove()
    expected = []
    for h_in, h_out in seen:
        h_out = h_out[0] if isinstance(h_out, tuple) else h_out
        expected.append(1 - float(torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean()))
    assert st["block_influence"] == pytest.approx(expected, abs=1e-5)


def first_mlp_inputs(src, out, calib_text):
    """The dense and pruned models, the dense first layer's MLP, and the down projection's inputs on
    the calibration windows, (tokens, 128)."""
    reference, pruned = load(src), load(out)
    mlp, inputs = decoder_layers(reference)[0].mlp, []
    hook = mlp.down_proj.register_forward_hook(lambda m, args, output: inputs.append(args[0]))
    with torch.no_grad():
        reference(calibration_windows(src, calib_text))
    hook.remove()
    return reference, pruned, mlp, torch.cat([t.reshape(-1, 128) for t in inputs])


def test_wanda_channels_rank_by_output_norm(tokenized, calib_text, tmp_path):
    src, out = tokenized["llama"], tmp_path / "out"
    assert run_cli(src, "--pattern", "channels", "--method", "wanda", "--sparsity", "0.25", "-o", out, "-q",
                   "--calib-data", calib_text, *CALIB) == 0
    reference, pruned, mlp, x = first_mlp_inputs(src, out, calib_text)
    # channel j's output over all tokens is the rank-one down[:, j] x_j: its norm is the product of norms
    scores = mlp.down_proj.weight.norm(dim=0) * x.norm(dim=0)
    kept = matches(mlp.gate_proj.weight, decoder_layers(pruned)[0].mlp.gate_proj.weight, 1)
    assert kept == sorted(torch.argsort(scores, descending=True)[:96].tolist())
    recipe = json.loads((out / "llmprune.json").read_text())
    assert recipe["calibration"]["nsamples"] == 4 and "wanda" in recipe["structured"]["importance"]


def test_flap_channels_rank_by_fluctuation(tokenized, calib_text, tmp_path):
    src, out = tokenized["llama"], tmp_path / "out"
    assert run_cli(src, "--pattern", "channels", "--method", "flap", "--sparsity", "0.25", "--no-reconstruct",
                   "-o", out, "-q", "--calib-data", calib_text, *CALIB) == 0
    reference, pruned, mlp, x = first_mlp_inputs(src, out, calib_text)
    x = x.double()
    # FLAP: the variance of channel j's input over the tokens times the squared norm of down[:, j]
    scores = x.var(dim=0, unbiased=False) * mlp.down_proj.weight.double().square().sum(0)
    kept = matches(mlp.gate_proj.weight, decoder_layers(pruned)[0].mlp.gate_proj.weight, 1)
    assert kept == sorted(torch.argsort(scores, descending=True)[:96].tolist())
    recipe = json.loads((out / "llmprune.json").read_text())
    assert "FLAP" in recipe["structured"]["importance"]


def test_flap_ranks_a_constant_input_last_where_wanda_ranks_it_first():
    from llmprune.reconstruct import InputMoments
    from llmprune.structured import unit_scores

    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 10 + 0.01 * x[:, 0]  # a large mean, little variance: FLAP's bias takes it over
    moments = InputMoments(4)
    moments.add(x)
    weight, columns = torch.ones(3, 4), torch.arange(4)[:, None]
    assert int(unit_scores("wanda", weight, moments, columns).argmax()) == 0
    assert int(unit_scores("flap", weight, moments, columns).argmin()) == 0
    torch.testing.assert_close(unit_scores("flap", weight, moments, columns),
                               3 * x.double().var(0, unbiased=False).float(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("args", [["--sparsity", "0.5"], ["--pattern", "hidden", "--sparsity", "0.1"],
                                  ["--pattern", "layers", "--sparsity", "0.25"]])
def test_flap_only_ranks_channels_and_heads(capsys, tmp_path, tokenized, args):
    assert run_cli(tokenized["llama"], "--method", "flap", *args, "-o", tmp_path / "out", "-q") == 2
    err = capsys.readouterr().err.strip()
    assert "--method flap ranks MLP channels and heads" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_wanda_heads_equal_the_model_with_heads_zeroed(tokenized, calib_text, tmp_path):
    src, out = tokenized["qwen2"], tmp_path / "out"
    # without the re-fit, so that only the removal itself is compared
    assert run_cli(src, "--pattern", "heads", "--method", "wanda", "--sparsity", "0.5", "--no-reconstruct", "-o", out,
                   "-q", "--calib-data", calib_text, *CALIB) == 0
    reference = load(src)
    removed = json.loads((out / "llmprune.json").read_text())["structured"]["removed"]
    for i, layer in enumerate(decoder_layers(reference)):
        zero_units(layer, ["self_attn.q_proj"], "self_attn.o_proj", removed[str(i)], 16)
    same_logits(reference, out)


def test_unit_selection_is_exact_and_breaks_ties_low():
    scores = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.0, 5.0, 4.0, 0.0]])
    assert masks.units(scores, 2).tolist() == [[True, False, False, True], [False, True, True, False]]
    assert masks.units(scores, 1).tolist() == [[True, False, True, True], [False, True, True, True]]


@pytest.mark.parametrize("family,args,message", [
    ("llama", ["--pattern", "channels", "--sparsity", "0.999"], "would remove all 128 MLP channels"),
    ("llama", ["--pattern", "heads", "--sparsity", "0.8"], "would remove all 2 query heads per KV group"),
    ("llama", ["--pattern", "heads", "--sparsity", "0.2"], "removes none of the 2 query heads per KV group"),
    ("llama", ["--pattern", "kv-heads", "--sparsity", "0.9"], "would remove all 2 KV groups"),
    ("llama", ["--pattern", "layers", "--sparsity", "0.9"], "would remove all 3 decoder layers"),
    ("opt", ["--pattern", "heads", "--sparsity", "0.5"], "OPTConfig cannot express the pruned model"),
    ("gpt2", ["--pattern", "kv-heads", "--sparsity", "0.5"], "GPT2Config cannot express the pruned model"),
    ("llama", ["--pattern", "channels", "--sparsity", "0.5", "--true-sequential"], "ratio is uniform"),
    ("llama", ["--pattern", "heads", "--sparsity", "0.5", "--schedule", "linear:0.1"], "ratio is uniform"),
    ("llama", ["--pattern", "rows", "--sparsity", "0.5"], "malformed pattern"),
])
def test_refusals(tiny_models, capsys, tmp_path, family, args, message):
    before = tree_hash(tiny_models[family])
    expect_error(capsys, tmp_path, [tiny_models[family], *args], message)
    assert tree_hash(tiny_models[family]) == before


def test_families_with_fused_projections_reload(tiny_models, tmp_path):
    """Phi-3's fused gate|up and q|k|v, Gemma 3's per-head norms: the output loads and runs."""
    for family, pattern, key, value in [("phi3", "channels", "intermediate_size", 64), ("phi3", "heads", "num_attention_heads", 2),
                                        ("gemma3_text", "kv-heads", "num_key_value_heads", 1)]:
        out = tmp_path / f"{family}-{pattern}"
        assert run_cli(tiny_models[family], "--pattern", pattern, "--sparsity", "0.5", "-o", out, "-q") == 0
        assert json.loads((out / "config.json").read_text())[key] == value
        logits = load(out)(torch.randint(0, 100, (1, 8))).logits
        assert torch.isfinite(logits).all()


def test_heads_refused_when_the_config_would_not_load(tmp_path):
    """transformers validates hidden_size % num_attention_heads when it loads a config: a head count
    that breaks it is refused up front rather than written as a checkpoint nobody can load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=256, num_attention_heads=8,
                               num_key_value_heads=2, num_hidden_layers=2, vocab_size=128)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    # 1 of 4 query heads per KV group -> 6 heads: 128 % 6 != 0
    assert run_cli(tmp_path / "dense", "--pattern", "heads", "--sparsity", "0.25", "-o", tmp_path / "out", "-q") == 2
    assert not (tmp_path / "out").exists()
    # 2 of 4 -> 4 heads: loads
    assert run_cli(tmp_path / "dense", "--pattern", "heads", "--sparsity", "0.5", "-o", tmp_path / "ok", "-q") == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ok").config.num_attention_heads == 4


@pytest.mark.parametrize("pattern,method", [("channels", "wanda"), ("channels", "sparsegpt"), ("heads", "wanda"),
                                            ("kv-heads", "sparsegpt")])
def test_reconstruction_brings_outputs_closer_to_dense(tiny_with_tokenizer, calib_text, tmp_path, pattern, method):
    """Re-fitting the readout's kept columns on the calibration states lowers the error of the
    final hidden states against the dense model's, on those calibration windows."""
    from llmprune.calibrate import calibration_ids
    from llmprune.config import PruneConfig
    from llmprune.source import open_source

    args = ["--pattern", pattern, "--sparsity", "0.5", "--method", method, "--calib-data", calib_text,
            "--nsamples", "4", "--seqlen", "64", "-q"]
    assert run_cli(tiny_with_tokenizer, *args, "-o", tmp_path / "re") == 0
    assert run_cli(tiny_with_tokenizer, *args, "--no-reconstruct", "-o", tmp_path / "plain") == 0
    cfg = PruneConfig(model=str(tiny_with_tokenizer), sparsity=0.5, calib_data=str(calib_text), nsamples=4, seqlen=64)
    ids = calibration_ids(cfg, open_source(str(tiny_with_tokenizer)))

    def final_hidden(folder):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            return model(ids, output_hidden_states=True).hidden_states[-1]

    dense = final_hidden(tiny_with_tokenizer)
    error = {k: float((final_hidden(tmp_path / k) - dense).norm() / dense.norm()) for k in ("re", "plain")}
    assert error["re"] < error["plain"], error
    recipe = json.loads((tmp_path / "re" / "llmprune.json").read_text())
    assert "re-fitted" in recipe["structured"]["importance"]
    assert recipe["config"]["reconstruct"] is True
