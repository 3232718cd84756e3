"""--pattern hidden: the residual width shrinks, and the output equals the input with those
dimensions zeroed in place (the norms' weights compensating the mean over fewer dimensions)."""

import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import FAMILIES, TOKENIZER_FILES, expect_error, run_cli, tree_hash

HIDDEN_FAMILIES = {**{f: FAMILIES[f] for f in ("llama", "mistral", "qwen2", "gemma3_text", "phi3")},
                   "qwen3": dict(FAMILIES["llama"], head_dim=16)}
CALIB = ("--nsamples", "4", "--seqlen", "32")


def build(family: str, folder, **overrides):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, **{**HIDDEN_FAMILIES[family], **overrides})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, max_shard_size="200KB")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_with_tokenizer):
    """Each family's tiny model with SmolLM2's tokenizer (so calibration text can be tokenised)."""
    root = tmp_path_factory.mktemp("hidden")
    folders = {}
    for family in HIDDEN_FAMILIES:
        folders[family] = build(family, root / family, vocab_size=49152)
        for name in TOKENIZER_FILES:
            shutil.copy(tiny_with_tokenizer / name, folders[family] / name)
    return folders


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def zero_dims(model, removed: list[int]) -> None:
    """The dense model whose residual stream never carries ``removed``: those embedding columns and
    the writers' output rows zeroed in place. The residual norms' epsilon is scaled by d'/d, which is
    how the shrunk model's epsilon acts (it adds to a mean over d' dimensions instead of d)."""
    d = model.config.hidden_size
    kept = d - len(removed)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, removed] = 0
        for layer in model.model.layers:
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight[removed] = 0
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dim() == 1 and weight.shape[0] == d:
                for attr in ("variance_epsilon", "eps"):
                    if isinstance(getattr(module, attr, None), float):
                        setattr(module, attr, getattr(module, attr) * kept / d)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("family", list(HIDDEN_FAMILIES))
def test_hidden_equals_the_model_with_dimensions_zeroed(models, calib_text, tmp_path, family, method):
    src, out = models[family], tmp_path / "out"
    before = tree_hash(src)
    calib = ("--calib-data", calib_text, *CALIB) if method == "wanda" else ()
    assert run_cli(src, "--pattern", "hidden", "--sparsity", "0.25", "--method", method, "-o", out, "-q", *calib) == 0
    assert tree_hash(src) == before
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 48 and config["head_dim"] == 16
    st = json.loads((out / "llmprune.json").read_text())["structured"]
    assert st["config"]["hidden_size"] == {"before": 64, "after": 48} and len(st["removed"]) == 16
    pruned, reference = load(out), load(src)
    params = sum(p.numel() for p in pruned.parameters())
    assert st["parameters"]["after"] == params < st["parameters"]["before"]
    assert pruned.get_input_embeddings().weight.shape == (49152, 48)
    if reference.config.tie_word_embeddings:  # tied stays tied: the head is the embedding
        assert pruned.get_output_embeddings().weight is pruned.get_input_embeddings().weight
    zero_dims(reference, st["removed"])
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, pruned(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    generated = pruned.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)
    card = (out / "README.md").read_text()
    assert "25.0% of its hidden width (64 -> 48)" in card


def calibration_windows(folder, calib_text):
    from llmprune.data import calibration_samples

    return calibration_samples(AutoTokenizer.from_pretrained(folder), str(calib_text), 4, 32, 0)


def test_wanda_ranks_by_the_readers_output_energy(models, calib_text, tmp_path):
    """score_i = sum over the linears reading the stream (q, k, v, gate, up in every layer; the head
    after the final norm) of ||W[:, i]||^2 times the sum of their input's x_i^2 over the calibration tokens."""
    src, out = models["llama"], tmp_path / "out"
    assert run_cli(src, "--pattern", "hidden", "--sparsity", "0.25", "--method", "wanda", "-o", out, "-q",
                   "--calib-data", calib_text, *CALIB) == 0
    model, scores, hooks = load(src), torch.zeros(64, dtype=torch.float64), []
    readers = [m for layer in model.model.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
               layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj)] + [model.lm_head]

    def hook(module, args, output):
        energy = args[0].double().reshape(-1, 64).square().sum(0)
        scores.add_(module.weight.double().square().sum(0) * energy)

    hooks = [m.register_forward_hook(hook) for m in readers]
    with torch.no_grad():
        model(calibration_windows(src, calib_text))
    for h in hooks:
        h.remove()
    st = json.loads((out / "llmprune.json").read_text())["structured"]
    assert st["removed"] == sorted(torch.argsort(scores)[:16].tolist())
    assert "output energy" in st["importance"]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_a_dead_dimension_is_removed(models, calib_text, tmp_path, method):
    """A planted dimension that carries nothing is among the removed ones: with calibration the
    embedding column and every writer row zeroed (the stream is zero there); by magnitude all its
    weights zeroed."""
    model, dead = load(models["llama"]), 37
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
            if method == "magnitude":
                for reader in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                               layer.mlp.gate_proj, layer.mlp.up_proj):
                    reader.weight[:, dead] = 0
        if method == "magnitude":
            model.lm_head.weight[:, dead] = 0
    src = tmp_path / "dead"
    model.save_pretrained(src)
    for name in TOKENIZER_FILES:
        shutil.copy(models["llama"] / name, src / name)
    calib = ("--calib-data", calib_text, *CALIB) if method == "wanda" else ()
    # 0.1 removes 8 of 64: the dead one must be among them
    assert run_cli(src, "--pattern", "hidden", "--sparsity", "0.1", "--method", method, "-o", tmp_path / "out",
                   "-q", *calib) == 0
    st = json.loads((tmp_path / "out" / "llmprune.json").read_text())["structured"]
    assert len(st["removed"]) == 8 and dead in st["removed"]


def test_width_rounds_to_what_the_config_accepts(tmp_path):
    """Llama needs hidden_size divisible by the head count: with 6 heads of a 96-wide stream, the kept
    width is the multiple of 24 (8 and 6) nearest to (1 - ratio) x 96."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **dict(FAMILIES["llama"], hidden_size=96, num_attention_heads=6,
                                                 num_key_value_heads=2, head_dim=16))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    assert run_cli(tmp_path / "dense", "--pattern", "hidden", "--sparsity", "0.3", "-o", tmp_path / "out", "-q") == 0
    assert load(tmp_path / "out").config.hidden_size == 72  # 67.2 -> 72, not 64 (64 % 6 != 0)


@pytest.mark.parametrize("family,args,message", [
    ("llama", ["--sparsity", "0.05"], "removes none of the 64 hidden dimensions"),
    ("llama", ["--sparsity", "0.5", "--method", "sparsegpt"], "ranks dimensions by magnitude or wanda"),
    ("llama", ["--sparsity", "0.5", "--schedule", "linear:0.1"], "ratio is uniform"),
    ("gpt2", ["--sparsity", "0.5"], "cannot prune the hidden width: transformer.wpe.weight"),
])
def test_refusals(tiny_models, capsys, tmp_path, family, args, message):
    before = tree_hash(tiny_models[family])
    expect_error(capsys, tmp_path, [tiny_models[family], "--pattern", "hidden", *args], message)
    assert tree_hash(tiny_models[family]) == before


def test_hidden_is_not_mixed_by_a_parameter_target(tiny_models, capsys, tmp_path):
    expect_error(capsys, tmp_path, [tiny_models["llama"], "--pattern", "hidden", "--target-params", "0.8",
                                    "--method", "wanda"], "--target-params mixes channels, heads, kv-heads, layers")
