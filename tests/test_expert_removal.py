"""``--pattern experts``: routed experts removed from every MoE layer; the output is a smaller
checkpoint that plain transformers loads and that computes what the input computes with the removed
experts' router logits at minus infinity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER_FILES, expect_error, run_cli, tree_hash
from safetensors.torch import load_file, save_file
from test_experts import FAMILIES, load, tiny
from transformers import AutoConfig, AutoModelForCausalLM

from llmprune.arch import ModelWithoutLayers
from llmprune.config import PruneConfig
from llmprune.experts import find_moe, record_routing
from llmprune.pruning import prune
from llmprune.source import open_source
from llmprune.stream import Activations, layers

# DeepSeek-V3: MLA has one KV head per head; 8 experts in 2 groups so that a quarter (one per group) can go
OVERRIDES = {"deepseek_v3": {"num_key_value_heads": 4, "n_routed_experts": 8}}
COUNT_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_local_experts",
             "olmoe": "num_experts", "deepseek_v3": "n_routed_experts", "gpt_oss": "num_local_experts"}
MOE_LAYERS = {"deepseek_v3": [1]}  # first_k_dense_replace=1; the others: both layers
CALIB = ("--nsamples", "4", "--seqlen", "32")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experts")


_tokenized: dict[tuple, Path] = {}


def tokenized(family: str, root: Path, **overrides) -> Path:
    """A tiny random ``family`` model with SmolLM2's tokenizer, so the CLI can calibrate on text."""
    overrides = {**OVERRIDES.get(family, {}), **overrides}
    key = (family, tuple(sorted(overrides.items())))
    if key not in _tokenized:
        torch.manual_seed(0)
        config = AutoConfig.for_model(family, **{**FAMILIES[family], "vocab_size": 49152, **overrides})
        folder = root / f"{family}-tok-{len(_tokenized)}"
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        from llmprune.packaged import smollm2_checkpoint
        for name in TOKENIZER_FILES:
            shutil.copy(smollm2_checkpoint() / name, folder / name)
        _tokenized[key] = folder
    return _tokenized[key]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def masked_router(family: str, removed: list[int]):
    """A forward hook for a router that redoes its routing (written out from each family's modeling
    code) with the logits of ``removed`` experts at minus infinity."""

    def hook(module, args, output):
        logits = output[0].clone()
        logits[:, removed] = float("-inf")
        k = module.top_k
        if family == "gpt_oss":  # top-k on the logits, softmax over the chosen
            top, index = torch.topk(logits, k, dim=-1)
            return output[0], F.softmax(top, dim=1, dtype=top.dtype), index
        if family == "deepseek_v3":  # sigmoid scores, grouped choice on biased scores, scaled weights
            scores = logits.sigmoid()
            choice = scores + module.e_score_correction_bias
            groups = choice.view(-1, module.num_group, module.num_experts // module.num_group).topk(2, dim=-1)[0].sum(-1)
            chosen = torch.zeros_like(groups).scatter_(1, torch.topk(groups, module.topk_group, dim=-1)[1], 1)
            eligible = chosen.unsqueeze(-1).expand(-1, module.num_group, module.num_experts // module.num_group)
            choice = choice.masked_fill(~eligible.reshape(-1, module.num_experts).bool(), float("-inf"))
            index = torch.topk(choice, k, dim=-1)[1]
            weights = scores.gather(1, index)
            if module.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return output[0], weights * module.routed_scaling_factor, index
        probs = F.softmax(logits.float(), dim=-1)  # Mixtral, Qwen2/3-MoE, OLMoE
        top, index = torch.topk(probs, k, dim=-1)
        if family == "mixtral" or module.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return output[0], top if family == "mixtral" else top.to(output[0].dtype), index

    return hook


def masked_logits(folder: Path, family: str, removed: dict[str, list[int]], ids: torch.Tensor) -> torch.Tensor:
    """The input model's logits with each MoE layer's removed experts' router logits at minus infinity."""
    model = load(folder)
    for index, layer in enumerate(model.model.layers):
        blocks = find_moe(layer)
        if blocks:
            layer.get_submodule(blocks[0].router).register_forward_hook(masked_router(family, removed[str(index)]))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_removed_experts_match_masked_routing(root, tmp_path, calib_text, family):
    folder = tokenized(family, root)
    before = tree_hash(folder)
    count = 8 if family == "deepseek_v3" else 4
    out = tmp_path / "out"
    assert run_cli(folder, "--pattern", "experts", "--sparsity", "0.25", "--calib-data", calib_text, *CALIB,
                   "-o", out, "-q") == 0
    assert tree_hash(folder) == before  # the input is never modified
    config = json.loads((out / "config.json").read_text())
    assert config[COUNT_KEY[family]] == count * 3 // 4
    recipe = json.loads((out / "llmprune.json").read_text())
    st = recipe["structured"]
    moe = MOE_LAYERS.get(family, [0, 1])
    assert sorted(st["removed"]) == [str(i) for i in moe]
    for i in moe:
        assert len(st["removed"][str(i)]) == count // 4 and len(st["scores"][str(i)]) == count
        scores = st["scores"][str(i)]  # the lowest go (ties to the lower index), DeepSeek: the lowest of each group
        groups = 2 if family == "deepseek_v3" else 1
        size = count // groups
        want = [g * size + min(range(size), key=lambda e: (scores[g * size + e], e)) for g in range(groups)]
        assert st["removed"][str(i)] == want
    assert st["config"] == {COUNT_KEY[family]: {"before": count, "after": count * 3 // 4}}
    assert st["parameters"]["after"] < st["parameters"]["before"]
    assert (out / "README.md").read_text().startswith("---")
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in load(folder).parameters())
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, masked_logits(folder, family, st["removed"], ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_on_disk_layout_kept(root, tmp_path, calib_text, family):
    """Per-expert tensors renumbered 0..kept-1 holding the kept experts in order; experts fused on disk
    (gpt-oss) and the router keep their kept rows; everything else is bit-identical."""
    folder = tokenized(family, root)
    out = tmp_path / "out"
    assert run_cli(folder, "--pattern", "experts", "--sparsity", "0.5", "--calib-data", calib_text, *CALIB,
                   "-o", out, "-q") == 0
    removed = json.loads((out / "llmprune.json").read_text())["structured"]["removed"]
    before, after = tensors(folder), tensors(out)
    for i in (0, 1):
        kept = [e for e in range(4) if e not in removed[str(i)]]
        assert len(kept) == 2
        stem = f"model.layers.{i}."
        if family == "mixtral":
            for new, old in enumerate(kept):
                for w in ("w1", "w2", "w3"):
                    name = f"{stem}block_sparse_moe.experts.{{}}.{w}.weight"
                    assert torch.equal(after[name.format(new)], before[name.format(old)])
            assert not any(f"{stem}block_sparse_moe.experts.{e}." in n for n in after for e in (2, 3))
            stacked = [f"{stem}block_sparse_moe.gate.weight"]
        else:
            stacked = [f"{stem}mlp.{n}" for n in ("router.weight", "router.bias", "experts.gate_up_proj",
                                                  "experts.gate_up_proj_bias", "experts.down_proj", "experts.down_proj_bias")]
        for name in stacked:
            assert torch.equal(after[name], before[name][kept]), name
    expert_names = {n for n in before if ".experts." in n or n.endswith(("gate.weight", "router.weight", "router.bias"))}
    for name in set(before) - expert_names:
        assert torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_reap_removes_a_planted_weak_expert(root, tmp_path, calib_text, family):
    """Expert 1 outputs nothing (its down projection zeroed): REAP scores it 0 and removes it in every
    layer, whatever the router sends it."""
    folder = tmp_path / "planted"
    shutil.copytree(tokenized(family, root), folder)
    state = tensors(folder)
    for i in (0, 1):
        if family == "mixtral":
            state[f"model.layers.{i}.block_sparse_moe.experts.1.w2.weight"].zero_()
        else:
            state[f"model.layers.{i}.mlp.experts.down_proj"][1].zero_()
            state[f"model.layers.{i}.mlp.experts.down_proj_bias"][1].zero_()
    for file in folder.glob("*.safetensors"):
        file.unlink()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert run_cli(folder, "--pattern", "experts", "--sparsity", "0.25", "--calib-data", calib_text, *CALIB,
                   "-o", out, "-q") == 0
    st = json.loads((out / "llmprune.json").read_text())["structured"]
    assert st["removed"] == {"0": [1], "1": [1]}
    assert all(scores[1] == 0 and min(scores[:1] + scores[2:]) > 0 for scores in st["scores"].values())


@pytest.mark.parametrize("method", ["reap", "frequency"])
def test_first_layer_scores_follow_their_definition(root, tmp_path, method):
    """Layer 0's scores from the routing the input model does on the same states: REAP the mean over
    routed tokens of weight x ||expert output||, frequency the routed token count."""
    folder = tiny("qwen2_moe", root)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    src = open_source(str(folder))
    acts = Activations(ModelWithoutLayers(src.layout, src.checkpoint.read, torch.device("cpu")), ids, 4,
                       torch.device("cpu"))
    module = next(layers(src.checkpoint, src.layout, torch.device("cpu"), progress=False)).module()
    (block,) = find_moe(module)
    with record_routing(module, block) as seen:
        acts.forward(module, 0)
    experts = module.get_submodule(block.experts)
    want = []
    for e in range(4):
        rows, weights = torch.cat([r.rows for r in seen[e]]), torch.cat([r.weights for r in seen[e]])
        if method == "frequency":
            want.append(float(rows.shape[0]))
            continue
        with torch.no_grad():  # expert e alone, weight 1, one token at a time
            norms = torch.stack([experts(x[None], torch.tensor([[e]]), torch.ones(1, 1)).norm() for x in rows])
        want.append(float((weights * norms).mean()))
    cfg = PruneConfig(model=str(folder), output=str(tmp_path / "out"), method=method, pattern="experts", sparsity=0.25)
    recipe = prune(cfg, progress=False, calib_ids=ids)
    got = recipe["structured"]["scores"]["0"]
    assert got == pytest.approx(want, rel=1e-5)
    assert sum(want) > 0 and recipe["structured"]["removed"]["0"] == [min(range(4), key=lambda e: (want[e], e))]
    assert recipe["calibration"]["nsamples"] == 4


def test_inspect_and_summary_show_fewer_experts(root, tmp_path, calib_text, capsys):
    folder = tokenized("qwen3_moe", root)
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_cli(folder, "--pattern", "experts", "--sparsity", "0.5", "--calib-data", calib_text, *CALIB,
                   "-o", out) == 0
    printed = capsys.readouterr().out
    assert "num_local_experts 4 -> 2" in printed and "reap (experts)" in printed, printed
    assert run_cli("inspect", out, "--json", "-q") == 0
    report = json.loads(capsys.readouterr().out)
    names = [m["name"] for m in report["matrices"] if ".experts." in m["name"]]
    assert len(names) == 2 * 2 * 3  # 2 layers x 2 kept experts x gate, up, down
    assert report["recipe"]["pattern"] == "experts" and report["recipe"]["method"] == "reap"
    assert report["experts"] == {"layers": 2, "per_layer": 2, "top_k": 2}
    assert run_cli("inspect", out) == 0
    assert "2 in each of 2 MoE layers, top-2" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "with 50% of its experts removed" in card and "REAP" in card


@pytest.mark.parametrize("family, args, message", [
    ("mixtral", ["--sparsity", "0.75"], "keeps 1 of 4 experts per layer, fewer than the 2 the router picks"),
    ("mixtral", ["--sparsity", "0.1"], "removes none of the 4 experts"),
    ("mixtral", ["--sparsity", "0.25", "--method", "wanda"], "ranks experts by reap"),
    ("deepseek_v3", ["--sparsity", "0.25"], "removes the same number from each group: 1 of 4 experts is not a multiple of 2"),
    ("deepseek_v3", ["--sparsity", "0.5"], "must keep at least 2 experts per group"),
])
def test_refusals(root, tmp_path, capsys, family, args, message):
    """One line, exit 2, nothing written, before any calibration (these models have no tokenizer)."""
    folder = tiny(family, root, **({"num_key_value_heads": 4} if family == "deepseek_v3" else {}))
    before = tree_hash(folder)
    expect_error(capsys, tmp_path, [folder, "--pattern", "experts", *args], message)
    assert tree_hash(folder) == before


def test_dense_model_refused(tiny_models, tmp_path, capsys):
    expect_error(capsys, tmp_path, [tiny_models["llama"], "--pattern", "experts", "--sparsity", "0.25"],
                 "--pattern experts needs a mixture-of-experts model")


def test_expert_scores_need_the_experts_pattern(tiny_models, tmp_path, capsys):
    expect_error(capsys, tmp_path, [tiny_models["llama"], "--sparsity", "0.5", "--method", "frequency"],
                 "--method frequency ranks routed experts: use it with --pattern experts")


def test_killed_run_resumes_bit_identical(root, tmp_path, calib_text):
    """Killed after layer 0 is journalled: the rerun keeps layer 0's removed experts and states."""
    from test_resume import RECIPE, kill_at, partials

    out, whole = tmp_path / "out", tmp_path / "whole"
    args = [tokenized("mixtral", root), "--pattern", "experts", "--sparsity", "0.25", "--calib-data", calib_text,
            *CALIB, "-o", out, "-q"]
    assert run_cli(*args) == 0
    out.rename(whole)
    kill_at("layer-0-committed", args)
    assert not out.exists() and len(partials(tmp_path)) == 1
    assert run_cli(*args) == 0
    assert tree_hash(out, RECIPE) == tree_hash(whole, RECIPE)
    recipe, reference = (json.loads((f / "llmprune.json").read_text()) for f in (out, whole))
    assert recipe["resumed_after_layers"] == 1
    assert recipe["structured"] == reference["structured"] and recipe["sparsity"] == reference["sparsity"]


def test_later_layers_are_scored_on_the_output_model(root, tmp_path):
    """Layer 1's routed token counts are those of the states the output's layer 0 (without its removed
    expert) produces, not the input's."""
    folder = tiny("olmoe", root)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(4))
    out = tmp_path / "out"
    cfg = PruneConfig(model=str(folder), output=str(out), method="frequency", pattern="experts", sparsity=0.25)
    got = prune(cfg, progress=False, calib_ids=ids)["structured"]["scores"]["1"]

    def layer1_counts(first: Path) -> list[float]:
        """Tokens routed to each of the input's layer-1 experts, on the states ``first``'s layer 0 gives."""
        src, inp = open_source(str(first)), open_source(str(folder))
        acts = Activations(ModelWithoutLayers(src.layout, src.checkpoint.read, torch.device("cpu")), ids, 4,
                           torch.device("cpu"))
        acts.advance(next(layers(src.checkpoint, src.layout, torch.device("cpu"), progress=False)).module(), 0)
        module = list(layers(inp.checkpoint, inp.layout, torch.device("cpu"), progress=False))[1].module()
        (block,) = find_moe(module)
        with record_routing(module, block) as seen:
            acts.forward(module, 1)
        return [float(sum(r.rows.shape[0] for r in seen.get(e, []))) for e in range(4)]

    assert got == layer1_counts(out)
    assert sum(got) == 4 * 32 * 2  # every token to top-2 experts
