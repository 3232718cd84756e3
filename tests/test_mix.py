"""Structured mixes (--pattern channels=0.25,heads=0.5,layers=0.25) and parameter targets (--target-params)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TOKENIZER_FILES, build_tiny, expect_error, run_cli, tree_hash
from llmprune import reconstruct
from llmprune.config import PruneConfig, parse_param_target
from llmprune.errors import LlmpruneError
from llmprune.masks import Pattern

CALIB = ["--calib-data", "sotu", "--nsamples", "4", "--seqlen", "64"]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer whose decoder layers hold a good share of the parameters."""
    from llmprune.packaged import smollm2_checkpoint

    smol = smollm2_checkpoint()
    folder = build_tiny("llama", tmp_path_factory.mktemp("wide") / "llama", vocab_size=49152, tie_word_embeddings=True,
                        intermediate_size=512, num_hidden_layers=4, shard="100MB")
    for name in TOKENIZER_FILES:
        shutil.copy(smol / name, folder / name)
    return folder


def params(folder) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


# --- the removal error the search measures ------------------------------------------------------


def test_removal_error_is_the_output_error_of_the_refitted_and_of_the_cut_weight():
    torch.manual_seed(0)
    x = torch.randn(400, 12) @ torch.randn(12, 12)  # correlated inputs (tokens, n)
    w = torch.randn(5, 12)
    moments = reconstruct.InputMoments(12)
    moments.add(x)
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    dense_out = x @ w.t()
    cut = w.clone()
    cut[:, [i for i in range(12) if i not in keep.tolist()]] = 0
    assert reconstruct.removal_error(w, moments, keep, refitted=False) == pytest.approx(
        float((dense_out - x @ cut.t()).square().sum(1).mean()), rel=1e-4)
    solution = torch.linalg.lstsq(x[:, keep].double(), dense_out.double()).solution.t().float()  # (out, k)
    best = float((dense_out - x[:, keep] @ solution.t()).square().sum(1).mean())
    refitted = reconstruct.removal_error(w, moments, keep, refitted=True, percdamp=1e-8)
    assert refitted == pytest.approx(best, rel=1e-3)
    assert refitted < 0.9 * reconstruct.removal_error(w, moments, keep, refitted=False)


# --- options ----------------------------------------------------------------------------------------


def test_mix_patterns_parse_and_malformed_ones_are_named():
    p = Pattern.parse("channels=0.2,heads=0.5,layers=0.1")
    assert p.structured and p.kinds == ("channels", "heads", "layers") and str(p) == "channels=0.2,heads=0.5,layers=0.1"
    assert Pattern.parse("channels,layers").parts == (("channels", None), ("layers", None))
    for text, message in (("channels=0.2,bogus=0.1", "'bogus' is not one of"), ("channels=2", "must lie in (0, 1)"),
                          ("channels=x", "must be a number"), ("channels=0.1,channels=0.2", "named twice"),
                          ("heads=0.5,kv-heads=0.5", "choose one"), ("channels=0.2,heads", "give every kind a ratio")):
        with pytest.raises(LlmpruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Pattern.parse(text)


def test_param_targets_parse():
    assert parse_param_target("0.8") == (0.8, None)
    assert parse_param_target(0.75) == (0.75, None)
    assert parse_param_target("1.5B") == (None, 1_500_000_000)
    assert parse_param_target("900m") == (None, 900_000_000)
    assert parse_param_target("120000") == (None, 120000)
    for bad in ("0", "1", "-0.5", "abc", "1.5X", "nan"):
        with pytest.raises(LlmpruneError, match="--target-params must be"):
            parse_param_target(bad)


@pytest.mark.parametrize("options, message", [
    (dict(target_params="0.8", method="wanda", sparsity=0.3), "drop --sparsity"),
    (dict(target_params="0.8", method="wanda", pattern="2:4"), "not --pattern 2:4"),
    (dict(target_params="0.8", method="magnitude"), "use --method wanda, sparsegpt or flap"),
    (dict(target_params="0.8", method="wanda", pattern="channels=0.2"), "fixes every ratio"),
    (dict(pattern="channels,heads"), "add --target-params"),
    (dict(pattern="channels=0.2,heads=0.5", sparsity=0.3), "drop --sparsity"),
    (dict(pattern="channels=0.2,heads=0.5", method="admm"), "not admm"),
])
def test_contradictory_options_are_refused(options, message):
    with pytest.raises(LlmpruneError, match=message):
        PruneConfig(model="m", **options)


# --- an explicit mix ----------------------------------------------------------------------------------


def _kept_rows(full: torch.Tensor, part: torch.Tensor) -> list[int]:
    """The rows of ``full`` that ``part`` holds, in order (exact copies: magnitude changes nothing)."""
    rows = []
    for row in part:
        match = torch.nonzero((full == row).all(1)).squeeze(1)
        assert len(match) == 1
        rows.append(int(match[0]))
    return rows


def test_an_explicit_mix_equals_the_input_with_its_units_zeroed_and_layers_skipped(wide, tmp_path):
    out = tmp_path / "out"
    before = tree_hash(wide)
    assert run_cli(wide, "--pattern", "channels=0.25,heads=0.5,layers=0.25", *CALIB, "-o", out, "-q") == 0
    assert tree_hash(wide) == before
    recipe = json.loads((out / "llmprune.json").read_text())
    st = recipe["structured"]
    assert st["mix"]["channels"] == {"removed_per_block": 128, "of": 512, "blocks": 1}
    assert st["mix"]["heads"]["removed_per_block"] == 1 and st["mix"]["layers"] == {"removed": 1, "of": 4}
    dropped = st["removed"]["layers"]
    assert len(dropped) == 1 and len(st["block_influence"]) == 4
    dense = AutoModelForCausalLM.from_pretrained(wide).eval()
    small = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (small.config.num_hidden_layers, small.config.intermediate_size, small.config.num_attention_heads,
            small.config.num_key_value_heads) == (3, 384, 2, 2)
    assert sum(p.numel() for p in small.parameters()) == st["parameters"]["after"]
    # the reference: the input with the removed heads and channels zeroed and the dropped layer skipped
    kept = [i for i in range(4) if i not in dropped]
    hd = 16
    with torch.no_grad():
        for new, old in enumerate(kept):
            ref, got = dense.model.layers[old], small.model.layers[new]
            channels = _kept_rows(ref.mlp.up_proj.weight, got.mlp.up_proj.weight)
            gone = [c for c in range(512) if c not in channels]
            ref.mlp.up_proj.weight[gone] = 0
            ref.mlp.gate_proj.weight[gone] = 0
            ref.mlp.down_proj.weight[:, gone] = 0
            for head in st["removed"]["heads"][str(old)]:
                ref.self_attn.q_proj.weight[head * hd:(head + 1) * hd] = 0
                ref.self_attn.o_proj.weight[:, head * hd:(head + 1) * hd] = 0
        dense.model.layers = torch.nn.ModuleList([dense.model.layers[i] for i in kept])
        for new, layer in enumerate(dense.model.layers):
            layer.self_attn.layer_idx = new
        dense.config.num_hidden_layers = 3
        ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
        expected = dense(ids, use_cache=False).logits
        actual = small(ids, use_cache=False).logits
    assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4)


def test_a_mix_ranked_on_calibration_data_reloads_and_records_its_parts(wide, tmp_path):
    out = tmp_path / "out"
    assert run_cli(wide, "--pattern", "heads=0.5,channels=0.5", "--method", "wanda", *CALIB, "-o", out, "-q") == 0
    recipe = json.loads((out / "llmprune.json").read_text())
    assert "re-fitted" in recipe["structured"]["importance"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.intermediate_size, model.config.num_attention_heads) == (256, 2)
    assert recipe["calibration"]["nsamples"] == 4
    assert "1 of 2 query heads per KV group, 256 of 512 MLP channels" in (out / "README.md").read_text()


# --- a parameter target --------------------------------------------------------------------------------


@pytest.mark.parametrize("target, pattern", [("0.93", None), ("3.3M", "channels,layers")])
def test_a_parameter_target_is_met_within_one_percent(wide, tmp_path, target, pattern):
    out = tmp_path / "out"
    dense = params(wide)
    args = ["--target-params", target, *(["--pattern", pattern] if pattern else []), *CALIB, "-o", out, "-q"]
    assert run_cli(wide, *args) == 0
    recipe = json.loads((out / "llmprune.json").read_text())
    search = recipe["structured"]["search"]
    goal = round(float(target) * dense) if not target.endswith("M") else 3_300_000
    assert search["target"] == goal and search["dense"] == dense
    got = params(out)
    assert 0.99 * goal <= got <= goal
    assert got == recipe["structured"]["parameters"]["after"] == search["chosen"]["parameters"]
    assert recipe["config"]["method"] == "wanda"  # the default with a target
    allowed = set(pattern.split(",")) if pattern else {"channels", "heads"}  # layers only when named
    used = {k for k, v in recipe["structured"]["mix"].items() if v.get("removed_per_block", v.get("removed"))}
    assert used and used <= allowed
    # the chosen plan is the least damaging of those considered, single kinds included
    assert all(search["chosen"]["damage"] <= alone["damage"] for alone in search["single_kind"].values())
    model = AutoModelForCausalLM.from_pretrained(out)
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_unreachable_targets_are_refused_in_one_line(wide, tmp_path, capsys):
    expect_error(capsys, tmp_path, [wide, "--target-params", "0.5", *CALIB], "cannot be met within 1%")
    expect_error(capsys, tmp_path, [wide, "--target-params", "900M", *CALIB], "has 3,")
    expect_error(capsys, tmp_path, [wide, "--target-params", "0.9", "--sparsity", "0.2", *CALIB], "drop --sparsity")


def test_a_killed_target_run_resumes_bit_identical_with_the_plan_it_chose(wide, tmp_path):
    from test_resume import RECIPE, kill_at, partials

    out, whole = tmp_path / "out", tmp_path / "whole"
    args = [wide, "--target-params", "0.93", *CALIB, "-o", out, "-q", "--max-shard-size", "1MB"]
    assert run_cli(*args) == 0
    out.rename(whole)
    kill_at("layer-2-committed", args)
    assert not out.exists() and len(partials(tmp_path)) == 1
    assert run_cli(*args) == 0
    assert tree_hash(out, RECIPE) == tree_hash(whole, RECIPE)
    recipe, reference = (json.loads((f / "llmprune.json").read_text()) for f in (out, whole))
    assert recipe["resumed_after_layers"] == 3
    assert recipe["structured"] == reference["structured"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"])
def test_mixes_and_targets_reload_in_plain_transformers_for_six_families(family, tmp_path, calib_text,
                                                                         tiny_with_tokenizer):
    from test_hidden import build

    src = build(family, tmp_path / "dense", vocab_size=49152)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_with_tokenizer / name, src / name)
    calib = ("--method", "wanda", "--calib-data", str(calib_text), "--nsamples", "4", "--seqlen", "32", "-q")
    dense = AutoModelForCausalLM.from_pretrained(src)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    assert run_cli(src, "--pattern", "channels=0.25,heads=0.5,layers=0.34", *calib, "-o", tmp_path / "mix") == 0
    total = sum(p.numel() for p in dense.parameters())
    decoder = sum(p.numel() for p in dense.model.layers.parameters())  # the embedding is most of a tiny model
    target = int(total - 0.4 * decoder)
    assert run_cli(src, "--target-params", str(target), *calib, "-o", tmp_path / "target") == 0
    for out in ("mix", "target"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / out).eval()
        assert type(model) is type(dense)
        params = sum(p.numel() for p in model.parameters())
        if out == "mix":
            assert model.config.intermediate_size == dense.config.intermediate_size * 3 // 4
            assert model.config.num_attention_heads == dense.config.num_attention_heads // 2
            assert model.config.num_hidden_layers == dense.config.num_hidden_layers - 1
        else:
            assert 0.99 * target <= params <= target
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
            assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 16)
