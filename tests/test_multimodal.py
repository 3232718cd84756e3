"""Multimodal (image-text-to-text) checkpoints and heads not named ``lm_head``, through the CLI.

Tiny random models of each tested family are built with transformers and saved as transformers
saves them (older layout on disk: ``language_model.model.layers.*``, or Qwen2-VL's ``model.layers.*``
beside ``visual.*``), with SmolLM2's tokenizer so calibration and evaluation text can be tokenised.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER_FILES, expect_error, run_cli
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from llmprune.packaged import smollm2_checkpoint

V = 49152  # SmolLM2's vocabulary
TEXT = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
MROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}

# family -> (config kwargs, checkpoint prefix of the language model's layers, prefixes outside it)
FAMILIES = {
    "gemma3": (dict(
        text_config=dict(TEXT, model_type="gemma3_text", head_dim=16, sliding_window=16,
                         layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 2, eoi_token_index=V - 3),
        "language_model.model.layers.", ("vision_tower", "multi_modal_projector")),
    "llava": (dict(
        text_config=dict(TEXT, model_type="llama"),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        image_token_index=V - 1),
        "language_model.model.layers.", ("vision_tower", "multi_modal_projector")),
    "qwen2_vl": (dict(
        text_config=dict(TEXT, model_type="qwen2_vl_text", rope_scaling=MROPE, bos_token_id=0, eos_token_id=0),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2),
        image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3),
        "model.layers.", ("visual",)),
    "qwen2_5_vl": (dict(
        text_config=dict(TEXT, model_type="qwen2_5_vl_text", rope_scaling=MROPE, bos_token_id=0, eos_token_id=0),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                           patch_size=14, spatial_merge_size=2, fullatt_block_indexes=[1]),
        image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3),
        "model.layers.", ("visual",)),
    "mistral3": (dict(
        text_config=dict(TEXT, model_type="mistral", head_dim=16),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14, head_dim=16),
        image_token_index=V - 1, spatial_merge_size=2),
        "language_model.model.layers.", ("vision_tower", "multi_modal_projector")),
}


def _with_tokenizer(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="2MB")
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_checkpoint() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multimodal")
    out = {}
    for family, (kwargs, _, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(family, **kwargs))
        out[family] = _with_tokenizer(model, root / family)
    return out


@pytest.fixture(scope="module")
def gpt_neox(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt_neox", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    return _with_tokenizer(AutoModelForCausalLM.from_config(config), tmp_path_factory.mktemp("neox") / "gpt_neox")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def reference_ppl(model, windows: torch.Tensor) -> float:
    """Perplexity through the model's own forward, by hand: mean NLL of token t + 1 given 0..t."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=windows).logits  # (n, T, V)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))
    return math.exp(float(nll))


METHODS = {
    "magnitude": ("--method", "magnitude", "--sparsity", "0.5"),
    "wanda": ("--method", "wanda", "--sparsity", "0.5"),
    "sparsegpt": ("--method", "sparsegpt", "--pattern", "2:4"),
    "channels": ("--method", "wanda", "--pattern", "channels", "--sparsity", "0.25"),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_multimodal_prunes_the_language_model_only(multimodal, calib_text, tmp_path, family, method):
    source, out = multimodal[family], tmp_path / "out"
    _, layers, outside = FAMILIES[family]
    assert run_cli(source, *METHODS[method], "--calib-data", calib_text, "--nsamples", 2, "--seqlen", 32,
                   "-o", out, "-q") == 0
    before, after = tensors(source), tensors(out)
    assert set(after) == set(before)  # the input's on-disk layout, every tensor kept
    for name, tensor in before.items():
        if name.startswith(outside):  # vision tower and projector: byte for byte the input's
            assert after[name].dtype == tensor.dtype and raw(after[name]) == raw(tensor), name
    q = after[f"{layers}0.self_attn.q_proj.weight"]
    if method == "channels":
        down = after[f"{layers}0.mlp.down_proj.weight"]
        assert down.shape == (64, 96)
        assert json.loads((out / "config.json").read_text())["text_config"]["intermediate_size"] == 96
    elif method == "sparsegpt":
        assert (q.reshape(-1, 4) == 0).sum(dim=1).eq(2).all()  # 2:4 in every group
    else:
        assert (q == 0).float().mean().item() == 0.5
    recipe = json.loads((out / "llmprune.json").read_text())
    assert set(recipe["sparsity"]["not_pruned"]) == set(outside)
    # 7 linears x 3 decoder layers, no vision linear; channels shrink gate, up and down alone
    assert recipe["sparsity"]["matrices_pruned"] == (9 if method == "channels" else 21)
    # the same Auto class loads it as the same class, every weight found
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == json.loads((source / "config.json").read_text())["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("family", list(FAMILIES))
def test_multimodal_eval_through_the_language_model(multimodal, calib_text, tmp_path, family):
    """``llmprune eval`` whole and streamed agree with the model's own forward on text."""
    from llmprune.perplexity import load_windows

    source = multimodal[family]
    results = {}
    for mode in ("--no-stream", "--stream"):
        path = tmp_path / f"{mode}.json"
        assert run_cli("eval", source, "--data", calib_text, "--seqlen", 32, "--max-windows", 2, mode,
                       "--json", path, "-q") == 0
        results[mode] = json.loads(path.read_text())
    assert results["--stream"]["mode"] == "streamed" and results["--no-stream"]["mode"] == "whole"
    windows = load_windows(str(source), str(calib_text), 32, 2)
    expected = reference_ppl(AutoModelForImageTextToText.from_pretrained(source), windows)
    for result in results.values():
        assert result["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_multimodal_refused_when_weights_do_not_match(multimodal, tmp_path, capsys):
    """A config whose checkpoint lacks the language model's layers is refused, naming the on-disk tensor."""
    folder = tmp_path / "mismatch"
    shutil.copytree(multimodal["llava"], folder)
    before = tensors(folder)
    for path in folder.glob("*.safetensors*"):
        path.unlink()
    from safetensors.torch import save_file
    save_file({k: v for k, v in before.items() if ".layers." not in k or "vision" in k}, str(folder / "model.safetensors"))
    expect_error(capsys, tmp_path, [folder, "--sparsity", "0.5"],
                 "the checkpoint has no tensor 'language_model.model.layers.0.self_attn.q_proj.weight': "
                 "weights do not match config.json")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gpt_neox_head_named_embed_out(gpt_neox, calib_text, tmp_path, method):
    """GPT-NeoX stores its head as ``embed_out.weight``: calibrated methods and eval find it from the model."""
    out = tmp_path / "out"
    assert run_cli(gpt_neox, "--method", method, "--sparsity", "0.5", "--calib-data", calib_text, "--nsamples", 2,
                   "--seqlen", 32, "--eval", calib_text, "--eval-seqlen", 32, "--eval-max-windows", 2,
                   "-o", out, "-q") == 0
    before, after = tensors(gpt_neox), tensors(out)
    assert raw(after["embed_out.weight"]) == raw(before["embed_out.weight"])
    assert (after["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] == 0).float().mean().item() == 0.5
    recipe = json.loads((out / "llmprune.json").read_text())
    assert "not_pruned" not in recipe["sparsity"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    from llmprune.perplexity import load_windows
    windows = load_windows(str(out), str(calib_text), 32, 2)
    assert recipe["eval"]["pruned"]["perplexity"] == pytest.approx(reference_ppl(model, windows), rel=1e-4)
    path = tmp_path / "ppl.json"
    assert run_cli("eval", out, "--data", calib_text, "--seqlen", 32, "--max-windows", 2, "--stream",
                   "--json", path, "-q") == 0
    assert json.loads(path.read_text())["perplexity"] == pytest.approx(reference_ppl(model, windows), rel=1e-4)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    text = dict(TEXT, intermediate_size=96, num_hidden_layers=2, head_dim=16, num_local_experts=2,
                num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 1], attention_chunk_size=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                  pixel_shuffle_ratio=0.5)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama4", text_config=text, vision_config=vision, image_token_index=V - 1)
    model = AutoModelForImageTextToText.from_config(config)
    return _with_tokenizer(model, tmp_path_factory.mktemp("llama4") / "llama4")


def test_llama4_magnitude_and_eval_through_its_causal_lm(llama4, calib_text, tmp_path):
    """Llama 4 wraps a whole causal LM (``language_model``): evaluation runs through it."""
    out = tmp_path / "out"
    assert run_cli(llama4, "--sparsity", "0.5", "--eval", calib_text, "--eval-seqlen", 32, "--eval-max-windows", 2,
                   "-o", out, "-q") == 0
    before, after = tensors(llama4), tensors(out)
    assert all(raw(after[n]) == raw(t) for n, t in before.items() if n.startswith(("vision_model", "multi_modal")))
    experts = after["language_model.model.layers.1.feed_forward.experts.gate_up_proj"]
    assert (experts == 0).float().mean().item() == 0.5
    recipe = json.loads((out / "llmprune.json").read_text())
    assert set(recipe["sparsity"]["not_pruned"]) == {"vision_model", "multi_modal_projector"}
    from llmprune.perplexity import load_windows
    model = AutoModelForImageTextToText.from_pretrained(out)
    expected = reference_ppl(model.language_model, load_windows(str(out), str(calib_text), 32, 2))
    assert recipe["eval"]["pruned"]["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_llama4_calibrated_methods_refused(llama4, calib_text, tmp_path, capsys):
    expect_error(capsys, tmp_path, [llama4, "--method", "wanda", "--sparsity", "0.5", "--calib-data", calib_text,
                                    "--nsamples", 2, "--seqlen", 32],
                 "llama4: Llama4TextExperts receives tokens already grouped by expert, so calibrated methods "
                 "(wanda, sparsegpt, admm, OWL) cannot see each expert's inputs; use --method magnitude")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_multimodal_layer_removal_renumbers_in_the_input_layout(multimodal, calib_text, tmp_path, family):
    """--pattern layers drops a decoder layer of the language model, never a vision block."""
    source, out = multimodal[family], tmp_path / "out"
    _, layers, outside = FAMILIES[family]
    assert run_cli(source, "--pattern", "layers", "--sparsity", "0.34", "--calib-data", calib_text, "--nsamples", 2,
                   "--seqlen", 32, "-o", out, "-q") == 0
    before, after = tensors(source), tensors(out)
    assert {n for n in after if n.startswith(layers)} == \
        {n for n in before if n.startswith(layers) and not n.startswith(f"{layers}2.")}
    assert all(raw(after[n]) == raw(t) for n, t in before.items() if n.startswith(outside))
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


# --- --prune-vision ------------------------------------------------------------------------------

def vision_linears(folder: Path, outside: tuple[str, ...]) -> list[str]:
    """The checkpoint names of the nn.Linear weights under the vision tower and projector, found with
    transformers itself (in memory ``model.vision_tower...``, on disk ``vision_tower...``)."""
    model = AutoModelForImageTextToText.from_pretrained(folder)
    names = [path.removeprefix("model.") + ".weight" for path, module in model.named_modules()
             if isinstance(module, torch.nn.Linear)]
    return [name for name in names if name.startswith(outside)]


def magnitude_kept(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """By hand: the round(s x numel) smallest |w| go (random weights: no ties)."""
    flat = weight.abs().flatten()
    drop = flat.argsort()[:round(sparsity * flat.numel())]
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[drop] = False
    return keep.view_as(weight)


VISION_FAMILIES = ["gemma3", "llava", "qwen2_vl"]


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_prune_vision_prunes_the_vision_linears_by_magnitude(multimodal, tmp_path, family):
    source, out = multimodal[family], tmp_path / "out"
    _, layers, outside = FAMILIES[family]
    assert run_cli(source, "--sparsity", "0.3", "--prune-vision", "-o", out, "-q") == 0
    before, after = tensors(source), tensors(out)
    assert set(after) == set(before)
    linears = vision_linears(source, outside)
    assert len(linears) == {"gemma3": 15, "llava": 14, "qwen2_vl": 10}[family]
    for name in linears:
        w, p = before[name], after[name]
        assert int((p == 0).sum()) == round(0.3 * w.numel()), name
        assert torch.equal(p, w * magnitude_kept(w, 0.3)), name  # the smallest 30% zeroed, the rest bit-identical
    # patch convolutions, norms, position embeddings, biases, Gemma 3's projection matrix: unchanged
    for name, tensor in before.items():
        if name.startswith(outside) and name not in linears:
            assert raw(after[name]) == raw(tensor), name
    assert (after[f"{layers}0.mlp.down_proj.weight"] == 0).sum() == round(0.3 * 64 * 128)
    sp = json.loads((out / "llmprune.json").read_text())["sparsity"]
    vision = sp["vision"]
    assert vision["criterion"] == "magnitude" and vision["matrices_pruned"] == len(linears)
    assert set(vision["matrices"]) == set(linears)
    assert all(m["target"] == 0.3 and m["achieved"] == round(0.3 * m["numel"]) / m["numel"]
               for m in vision["matrices"].values())
    # Gemma 3's projector holds no linear (a bare projection matrix and a norm): it stays not pruned
    assert vision["parts"] == (["vision_tower"] if family == "gemma3" else list(outside))
    assert list(sp.get("not_pruned", {})) == (["multi_modal_projector"] if family == "gemma3" else [])
    assert sp["matrices_pruned"] == 21  # the decoder linears, counted apart as before
    assert f"| vision linears | {len(linears)} of {', '.join(vision['parts'])} pruned by magnitude" in \
        (out / "README.md").read_text()
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == json.loads((source / "config.json").read_text())["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    linear = dict(model.named_modules())["model." + linears[0].removesuffix(".weight")]
    assert torch.equal(linear.weight, after[linears[0]])


def test_default_leaves_vision_out_of_the_recipe(multimodal, tmp_path):
    """Without --prune-vision the recipe has no vision section and no new config key (same bytes as before)."""
    out = tmp_path / "out"
    assert run_cli(multimodal["llava"], "--sparsity", "0.5", "-o", out, "-q") == 0
    recipe = json.loads((out / "llmprune.json").read_text())
    assert "vision" not in recipe["sparsity"] and "prune_vision" not in recipe["config"]
    assert "--prune-vision" not in (out / "README.md").read_text()


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl"])
def test_prune_vision_wanda_2of4_calibrates_the_language_model_only(multimodal, calib_text, tmp_path, caplog, capsys,
                                                                    family):
    """Wanda 2:4: the decoder layers exactly as without --prune-vision, the vision linears 2:4 by magnitude."""
    source = multimodal[family]
    _, layers, outside = FAMILIES[family]
    args = ("--method", "wanda", "--pattern", "2:4", "--calib-data", calib_text, "--nsamples", 2, "--seqlen", 32, "-q")
    assert run_cli(source, *args, "-o", tmp_path / "plain") == 0
    caplog.clear()
    assert run_cli(source, *args, "--prune-vision", "-o", tmp_path / "out") == 0
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    parts = "vision_tower" if family == "gemma3" else "visual"
    assert f"--prune-vision: the {len(vision_linears(source, outside))} linears of {parts} are pruned by magnitude, " \
           "not wanda: calibration text reaches only the language model" in warning
    before, plain, after = tensors(source), tensors(tmp_path / "plain"), tensors(tmp_path / "out")
    for name in after:
        if name.startswith(layers):
            assert raw(after[name]) == raw(plain[name]), name
    for name in vision_linears(source, outside):
        w, groups = before[name], before[name].reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
        assert torch.equal(after[name], (groups * keep).view_as(w)), name  # the 2 largest |w| of every 4 kept
    recipe = json.loads((tmp_path / "out" / "llmprune.json").read_text())
    assert recipe["calibration"]["nsamples"] == 2 and recipe["config"]["prune_vision"] is True
    assert recipe["sparsity"]["vision"]["overall"] == 0.5
    capsys.readouterr()
    assert run_cli("inspect", tmp_path / "out", "--json", "-q") == 0
    inspected = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in inspected["vision"]} == set(vision_linears(source, outside))
    assert all(m["sparsity"] == 0.5 and m["n_m"]["2:4"] for m in inspected["vision"])
    assert inspected["totals"]["vision"]["n_m"]["2:4"] and inspected["totals"]["n_m"]["2:4"]


def test_prune_vision_follows_ratio_rules_by_checkpoint_name(multimodal, tmp_path):
    source, out = multimodal["llava"], tmp_path / "out"
    rules = tmp_path / "rules.yaml"
    rules.write_text('"multi_modal_projector.*": 0.0\n"re:vision_tower\\\\.encoder\\\\.layers\\\\.0\\\\..*": 0.75\n')
    assert run_cli(source, "--sparsity", "0.5", "--prune-vision", "--ratios", rules, "-o", out, "-q") == 0
    before, after = tensors(source), tensors(out)
    for name in vision_linears(source, ("vision_tower", "multi_modal_projector")):
        zeros = int((after[name] == 0).sum())
        if name.startswith("multi_modal_projector"):
            assert raw(after[name]) == raw(before[name]), name
        else:
            expected = 0.75 if name.startswith("vision_tower.encoder.layers.0.") else 0.5
            assert zeros == round(expected * after[name].numel()), name
    sp = json.loads((out / "llmprune.json").read_text())["sparsity"]
    assert sp["vision"]["parts"] == ["vision_tower"] and list(sp["not_pruned"]) == ["multi_modal_projector"]
    assert (after["language_model.model.layers.0.self_attn.q_proj.weight"] == 0).float().mean().item() == 0.5


@pytest.mark.parametrize("ratios", [("--schedule", "linear:0.2"), ("--ratios", "owl")])
def test_prune_vision_takes_the_uniform_sparsity_under_depth_ratios(multimodal, calib_text, tmp_path, ratios):
    """A schedule or OWL sets the decoder layers' ratios; the vision linears keep --sparsity."""
    out = tmp_path / "out"
    assert run_cli(multimodal["llava"], "--sparsity", "0.5", "--prune-vision", *ratios, "--calib-data", calib_text,
                   "--nsamples", 2, "--seqlen", 32, "-o", out, "-q") == 0
    sp = json.loads((out / "llmprune.json").read_text())["sparsity"]
    assert len(set(sp["layers"])) == 3 and sp["target_mean"] == pytest.approx(0.5)
    assert len(sp["vision"]["matrices"]) == 14
    assert all(m["target"] == 0.5 and m["achieved"] == 0.5 for m in sp["vision"]["matrices"].values())


def test_prune_vision_from_python_and_resumed(multimodal, tmp_path):
    """The API takes ``prune_vision=``; a run killed after layer 1 resumes with the vision zeros journalled."""
    from test_resume import kill_at, partials

    import llmprune

    source, out, whole = multimodal["qwen2_vl"], tmp_path / "out", tmp_path / "whole"
    recipe = llmprune.prune(str(source), sparsity=0.5, prune_vision=True, output=str(whole), progress=False)
    assert "--prune-vision" in recipe["command"] and recipe["sparsity"]["vision"]["matrices_pruned"] == 10
    args = [source, "--sparsity", "0.5", "--prune-vision", "-o", out, "-q"]
    kill_at("layer-1-committed", args)
    assert len(partials(tmp_path)) == 1
    assert run_cli(*args) == 0
    resumed = json.loads((out / "llmprune.json").read_text())
    assert resumed["resumed_after_layers"] == 2 and resumed["sparsity"] == recipe["sparsity"]
    assert all(raw(t) == raw(tensors(whole)[n]) for n, t in tensors(out).items())


@pytest.mark.parametrize("args,message", [
    (["--pattern", "channels", "--sparsity", "0.25"], "--prune-vision prunes single weights of the vision tower and "
     "projector: it takes an unstructured or N:M --pattern, not --pattern channels"),
    (["--target-params", "0.9", "--method", "wanda"], "--prune-vision prunes single weights of the vision tower and "
     "projector: it takes an unstructured or N:M --pattern, not --target-params"),
])
def test_prune_vision_refuses_structured_patterns(multimodal, tmp_path, capsys, args, message):
    expect_error(capsys, tmp_path, [multimodal["llava"], "--prune-vision", *args], message)


def test_prune_vision_refused_on_a_text_only_model(gpt_neox, tmp_path, capsys):
    expect_error(capsys, tmp_path, [gpt_neox, "--sparsity", "0.5", "--prune-vision"],
                 f"--prune-vision: {gpt_neox} has no vision tower or projector")


@pytest.mark.parametrize("save_format", ["dense", "sparse-bitmask"])
def test_llmprune_load_gives_the_multimodal_class(multimodal, tmp_path, save_format):
    """``llmprune.load`` builds a multimodal output with its own class (not a causal LM), in either
    save format, with the vision linears' zeros in place."""
    import llmprune

    source, out = multimodal["llava"], tmp_path / "out"
    _, _, outside = FAMILIES["llava"]
    assert run_cli(source, "--sparsity", "0.5", "--prune-vision", "--save-format", save_format, "-o", out, "-q") == 0
    model = llmprune.load(out)
    assert type(model) is type(AutoModelForImageTextToText.from_pretrained(source))
    vision = {n: m.weight for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ("vision_tower" in n or "multi_modal_projector" in n)}
    assert len(vision) == len(vision_linears(source, outside)) == 14
    for name, weight in vision.items():
        assert int((weight == 0).sum()) == weight.numel() // 2, name
    if save_format == "sparse-bitmask":  # the same weights as the dense save's
        dense = tmp_path / "dense"
        assert run_cli(source, "--sparsity", "0.5", "--prune-vision", "-o", dense, "-q") == 0
        for (name, a), b in zip(model.state_dict().items(), llmprune.load(dense).state_dict().values()):
            assert torch.equal(a, b), name
