"""Quantized inputs: FP8 block-scaled and MXFP4 checkpoints are read dequantized, exactly as
transformers dequantizes them, pruned into plain checkpoints; every other format is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, expect_error, run_cli
from safetensors.torch import load_file, save_file
from test_experts import FAMILIES as MOE_FAMILIES
from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

from llmprune import quantized
from llmprune.checkpoint import Checkpoint
from llmprune.cli.summaries import summary
from llmprune.config import PruneConfig
from llmprune.perplexity import evaluate
from llmprune.pruning import prune

FP8_LINEARS = ("proj.weight",)  # every decoder linear of the tiny models: q/k/v/o, gate/up/down
IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's block quantizer: each block's amax maps to 448 (float8_e4m3fn's largest value)."""
    rows, cols = w.shape
    scale = torch.zeros(-(-rows // block[0]), -(-cols // block[1]))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            scale[i, j] = w[part].float().abs().max() / 448
            q[part] = (w[part].float() / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def rewrite(folder: Path, state: dict[str, torch.Tensor], quantization: dict) -> Path:
    for file in list(folder.glob("*.safetensors")) + list(folder.glob("*.index.json")):
        file.unlink()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    return folder


def fp8_checkpoint(folder: Path, block: tuple[int, int] = (32, 32)) -> Path:
    """A tiny bfloat16 Llama whose decoder linears are stored as FP8 with block scales."""
    build_tiny("llama", folder, dtype=torch.bfloat16, num_hidden_layers=2)
    state = {}
    for name, t in tensors(folder).items():
        if ".layers." in name and name.endswith(FP8_LINEARS):
            state[name], state[name + "_scale_inv"] = quantize_fp8(t, block)
        else:
            state[name] = t
    return rewrite(folder, state, {"quant_method": "fp8", "weight_block_size": list(block),
                                   "activation_scheme": "dynamic"})


def fp8_moe_checkpoint(folder: Path) -> Path:
    """A tiny bfloat16 Qwen3-MoE, experts stored one tensor per expert, every decoder linear
    (attention and each expert's gate/up/down) FP8 in 8 x 8 blocks, as DeepSeek-V3 ships them."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", **MOE_FAMILIES["qwen3_moe"])
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    state = {}
    for name, t in tensors(folder).items():
        if ".layers." in name and name.endswith(FP8_LINEARS):
            state[name], state[name + "_scale_inv"] = quantize_fp8(t, (8, 8))
        else:
            state[name] = t
    return rewrite(folder, state, {"quant_method": "fp8", "weight_block_size": [8, 8],
                                   "modules_to_not_convert": ["lm_head", "mlp.gate"]})


def mxfp4_checkpoint(folder: Path) -> Path:
    """A tiny bfloat16 gpt-oss whose experts are stored as MXFP4: random E2M1 codes (every byte is
    two valid values) and E8M0 exponents around 2**0."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt_oss", **{**MOE_FAMILIES["gpt_oss"], "intermediate_size": 64})
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, t in tensors(folder).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inputs, outputs = t.shape  # stored (E, out, in / 32, 16)
            state[name + "_blocks"] = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8,
                                                    generator=g)
            state[name + "_scales"] = torch.randint(122, 128, (experts, outputs, inputs // 32), dtype=torch.uint8,
                                                    generator=g)
        else:
            state[name] = t
    return rewrite(folder, state, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> Path:
    return fp8_checkpoint(tmp_path_factory.mktemp("fp8") / "llama")


@pytest.fixture(scope="module")
def fp8_moe(tmp_path_factory) -> Path:
    return fp8_moe_checkpoint(tmp_path_factory.mktemp("fp8moe") / "qwen3_moe")


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> Path:
    return mxfp4_checkpoint(tmp_path_factory.mktemp("mxfp4") / "gpt_oss")


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


# --- the dequantization itself --------------------------------------------------------------------

def test_fp8_blocks_cut_at_the_edges():
    """A (70, 100) weight in 32 x 48 blocks: 3 x 3 scales, the last row and column of blocks short."""
    w = torch.randn(70, 100, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_fp8(w, (32, 48))
    assert scale.shape == (3, 3)
    got = quantized.dequantize_fp8(q, scale, (32, 48), torch.float32)
    want = torch.tensor([[q[i, j].float().item() * scale[i // 32, j // 48].item() for j in range(100)]
                         for i in range(70)])
    assert torch.equal(got, want)
    assert torch.equal(quantized.dequantize_fp8(q, scale, (32, 48), torch.bfloat16), want.to(torch.bfloat16))


def test_fp8_equals_transformers_dequantization():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(2))
    q, scale = quantize_fp8(w, (128, 128))
    want = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.bfloat16)
    assert torch.equal(quantized.dequantize_fp8(q, scale, (128, 128), torch.bfloat16), want)


def test_fp8_per_tensor_scale():
    q = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn)
    got = quantized.dequantize_fp8(q, torch.tensor(0.25), None, torch.float32)
    assert got.tolist() == [[0.25, -0.5], [0.125, 112.0]]


def test_mxfp4_unpacks_two_values_per_byte_low_nibble_first():
    """Byte 0x21 holds E2M1 codes 1 (0.5, low nibble) then 2 (1.0); exponent byte 128 scales by 2."""
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, 0] = 0x21
    blocks[0, 1, 0, 15] = 0xF7  # codes 7 (6.0) then 15 (-6.0): the last two inputs of output row 1
    scales = torch.tensor([[[128], [125]]], dtype=torch.uint8)  # 2**1, 2**-2
    w = quantized.dequantize_mxfp4(blocks, scales, torch.float32)
    assert w.shape == (1, 32, 2)  # (E, in, out): gpt-oss's in-memory layout
    assert w[0, :, 0].tolist() == [1.0, 2.0] + [0.0] * 30
    assert w[0, :, 1].tolist() == [0.0] * 30 + [1.5, -1.5]


# --- the reader -----------------------------------------------------------------------------------

def test_fp8_reader_presents_plain_weights(fp8):
    checkpoint = Checkpoint(fp8)
    assert not [n for n in checkpoint.names if "scale" in n]
    name = "model.layers.1.mlp.down_proj.weight"
    assert checkpoint.spec(name).dtype == torch.bfloat16 and checkpoint.spec(name).shape == (64, 128)
    assert checkpoint.dequantized == "input FP8 (block 32x32) dequantized to bfloat16"
    reference = AutoModelForCausalLM.from_pretrained(fp8, quantization_config=FineGrainedFP8Config(dequantize=True))
    for param, value in reference.state_dict().items():
        if param in checkpoint:
            assert torch.equal(checkpoint.read(param), value), param


def test_mxfp4_reader_presents_plain_weights(mxfp4):
    checkpoint = Checkpoint(mxfp4)
    names = checkpoint.names
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not [n for n in names if n.endswith(("_blocks", "_scales"))]
    assert checkpoint.spec("model.layers.0.mlp.experts.down_proj").shape == (4, 64, 32)
    assert checkpoint.dequantized == "input MXFP4 (E2M1, 32-value blocks with E8M0 scales) dequantized to bfloat16"
    reference = AutoModelForCausalLM.from_pretrained(mxfp4, quantization_config=Mxfp4Config(dequantize=True))
    state = reference.state_dict()
    assert set(names) == set(state)
    assert all(torch.equal(checkpoint.read(n), state[n]) for n in names)


# --- pruning, evaluation and inspection through the reader ----------------------------------------

def check_plain_output(out: Path, source: Path, dequantized: str) -> dict[str, torch.Tensor]:
    """``out`` is an ordinary bfloat16 checkpoint of the input's plain names, says what was
    dequantized, and reloads with plain transformers; returns its tensors."""
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    state = tensors(out)
    assert set(state) == set(Checkpoint(source).names)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((out / "llmprune.json").read_text())["input"]["dequantized"] == dequantized
    assert f"{dequantized[0].upper()}{dequantized[1:]} on read" in (out / "README.md").read_text()
    assert torch.isfinite(logits(AutoModelForCausalLM.from_pretrained(out))).all()
    return state


def check_pruned(state: dict[str, torch.Tensor], source: Path, names: list[str], sparsity: float) -> None:
    """Each pruned matrix keeps the dequantized input's values where it keeps any, at ``sparsity``."""
    checkpoint = Checkpoint(source)
    for name in names:
        kept = state[name] != 0
        assert torch.equal(state[name], checkpoint.read(name) * kept), name
        assert 1 - kept.float().mean().item() == pytest.approx(sparsity, abs=1e-6), name


@pytest.mark.parametrize("args", [["--sparsity", "0.5"], ["--pattern", "2:4"]])
def test_fp8_magnitude_prunes_into_a_plain_checkpoint(fp8, tmp_path, args):
    assert run_cli(fp8, *args, "-o", tmp_path / "out", "-q") == 0
    state = check_plain_output(tmp_path / "out", fp8, "input FP8 (block 32x32) dequantized to bfloat16")
    linears = [n for n in state if ".layers." in n and n.endswith(FP8_LINEARS)]
    assert len(linears) == 14
    check_pruned(state, fp8, linears, 0.5)


def test_fp8_wanda(fp8, tmp_path):
    cfg = PruneConfig(model=str(fp8), output=str(tmp_path / "out"), method="wanda", sparsity=0.5)
    recipe = prune(cfg, progress=False, calib_ids=IDS)
    assert "input  FP8 (block 32x32) dequantized to bfloat16\n" in summary(recipe)
    state = check_plain_output(tmp_path / "out", fp8, "input FP8 (block 32x32) dequantized to bfloat16")
    check_pruned(state, fp8, [n for n in state if ".layers." in n and n.endswith(FP8_LINEARS)], 0.5)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_mxfp4_experts_prune_into_a_plain_checkpoint(mxfp4, tmp_path, method):
    cfg = PruneConfig(model=str(mxfp4), output=str(tmp_path / "out"), method=method, sparsity=0.5)
    prune(cfg, progress=False, calib_ids=IDS)
    state = check_plain_output(tmp_path / "out", mxfp4,
                               "input MXFP4 (E2M1, 32-value blocks with E8M0 scales) dequantized to bfloat16")
    experts = [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 4
    checkpoint = Checkpoint(mxfp4)
    for name in experts:  # every expert matrix at 50%, each kept weight the dequantized input's
        kept = state[name] != 0
        assert torch.equal(state[name], checkpoint.read(name) * kept), name
        assert kept.float().mean(dim=(1, 2)).tolist() == [0.5] * 4, name


def test_fp8_experts_prune_per_expert(fp8_moe, tmp_path):
    """DeepSeek-V3's layout: FP8 experts one tensor each, fused in memory, written back one each."""
    assert run_cli(fp8_moe, "--pattern", "2:4", "-o", tmp_path / "out", "-q") == 0
    state = check_plain_output(tmp_path / "out", fp8_moe, "input FP8 (block 8x8) dequantized to bfloat16")
    experts = [n for n in state if ".experts." in n]
    assert len(experts) == 2 * 4 * 3 and "model.layers.1.mlp.experts.3.up_proj.weight" in experts
    check_pruned(state, fp8_moe, experts, 0.5)


@pytest.mark.parametrize("kind", ["fp8", "fp8_moe", "mxfp4"])
def test_output_gives_transformers_dequantized_logits(fp8, fp8_moe, mxfp4, tmp_path, kind):
    """Nothing pruned: the output is the input as transformers dequantizes it, logits bit for bit."""
    source, option = {"fp8": (fp8, FineGrainedFP8Config(dequantize=True)),
                      "fp8_moe": (fp8_moe, FineGrainedFP8Config(dequantize=True)),
                      "mxfp4": (mxfp4, Mxfp4Config(dequantize=True))}[kind]
    assert run_cli(source, "--sparsity", "0", "-o", tmp_path / "out", "-q") == 0
    reference = AutoModelForCausalLM.from_pretrained(source, quantization_config=option)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), logits(reference))


@pytest.mark.parametrize("stream", [False, True])
def test_eval_reads_the_quantized_input(fp8, tmp_path, stream):
    assert run_cli(fp8, "--sparsity", "0", "-o", tmp_path / "plain", "-q") == 0
    quant = evaluate(str(fp8), windows=IDS, stream=stream, batch_size=2, progress=False)
    plain = evaluate(str(tmp_path / "plain"), windows=IDS, stream=stream, batch_size=2, progress=False)
    assert quant.perplexity == plain.perplexity


def test_inspect_reads_the_quantized_input(mxfp4, capsys):
    capsys.readouterr()
    assert run_cli("inspect", mxfp4, "--json", "-q") == 0
    rows = {m["name"]: m for m in json.loads(capsys.readouterr().out)["matrices"]}
    assert rows["model.layers.1.mlp.experts.gate_up_proj[3].up"]["shape"] == [64, 32]


# --- refused ----------------------------------------------------------------------------------------

READS = "llmprune dequantizes only FP8 block-scaled ('fp8') and MXFP4 ('mxfp4') inputs"


@pytest.mark.parametrize("quantization, error", [
    ({"quant_method": "gptq", "bits": 4}, "GPTQ quantized weights (quant_method 'gptq') cannot be read; " + READS),
    ({"quant_method": "awq", "bits": 4}, "AWQ quantized weights (quant_method 'awq') cannot be read; " + READS),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True},
     "bitsandbytes 4-bit quantized weights (quant_method 'bitsandbytes') cannot be read; " + READS),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"},
     "compressed-tensors pack-quantized quantized weights (quant_method 'compressed-tensors') cannot be read; " + READS),
    ({"quant_method": "fp8", "activation_scheme": "static"},
     "FP8 with static activation scales (activation_scheme 'static') cannot be read; llmprune dequantizes FP8 with "
     "float block scales and dynamic activations only"),
])
def test_other_formats_refused_by_name(tiny_models, tmp_path, capsys, quantization, error):
    folder = tmp_path / "quantized"
    folder.mkdir()
    for file in tiny_models["llama"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    expect_error(capsys, tmp_path, [folder, "--sparsity", "0.5"], f"llmprune: error: {folder / 'config.json'}: {error}")
    assert run_cli("inspect", folder, "-q") == 2


def test_fp8_weight_without_its_scale_refused(fp8, tmp_path, capsys):
    folder = tmp_path / "fp8"
    folder.mkdir()
    for file in fp8.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    state = tensors(folder)
    del state["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    expect_error(capsys, tmp_path, [folder, "--sparsity", "0.5"],
                 "model.layers.0.self_attn.q_proj.weight is stored as float8_e4m3fn without "
                 "model.layers.0.self_attn.q_proj.weight_scale_inv: its scale is missing")
