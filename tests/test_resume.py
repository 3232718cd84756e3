"""Resumable runs: SIGKILL at several points, rerun the same command, get the same bytes.

llmprune.json records wall times and how the run was resumed, so it is the one file compared
apart; every other file of the output (shards, index, config, tokenizer, model card) must be
bit-identical to an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, tree_hash

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ("llmprune.json",)


def kill_at(fault: str, args: list) -> None:
    """Run the CLI in a child process that SIGKILLs itself at ``fault``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMPRUNE_FAULT_AT": fault}
    res = subprocess.run([sys.executable, "-m", "llmprune.cli", *map(str, args)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".partial-" in p.name]


def prune_args(src, out, method, calib_text):
    args = [src, "--sparsity", "0.5", "--method", method, "-o", out, "-q", "--max-shard-size", "100KB"]
    if method != "magnitude":
        args += ["--calib-data", calib_text, "--nsamples", "3", "--seqlen", "32"]
    return args


@pytest.mark.parametrize("method,fault,resumed", [
    ("wanda", "tensor:model.layers.1.mlp.up_proj.weight", 1),  # half a tensor on disk
    ("wanda", "layer-1-committed", 2),
    ("wanda", "layer-1-states-saved", 1),  # layer 1's states on disk, not yet in the journal
    ("sparsegpt", "layer-0-written", 0),  # written but not yet in the journal
    ("magnitude", "finalize", 3),  # every layer done, folder not yet renamed
])
def test_killed_run_resumes_bit_identical(tiny_with_tokenizer, calib_text, tmp_path, method, fault, resumed):
    out, whole = tmp_path / "out", tmp_path / "whole"
    args = prune_args(tiny_with_tokenizer, out, method, calib_text)
    assert run_cli(*args) == 0
    out.rename(whole)  # the same command (it is in the model card) for both runs
    kill_at(fault, args)
    assert not out.exists() and len(partials(tmp_path)) == 1
    assert run_cli(*args) == 0
    assert tree_hash(out, RECIPE) == tree_hash(whole, RECIPE)
    assert not partials(tmp_path), "the partial folder was not renamed into place"
    assert not (out / ".resume").exists()
    recipe, reference = (json.loads((f / "llmprune.json").read_text()) for f in (out, whole))
    assert recipe.get("resumed_after_layers", 0) == resumed
    assert recipe["sparsity"] == reference["sparsity"]


def test_resume_needs_the_same_options_and_an_intact_journal(tiny_models, tmp_path, capsys):
    src = tiny_models["llama"]
    out = tmp_path / "out"
    args = [src, "--sparsity", "0.5", "-o", out, "-q", "--max-shard-size", "60KB"]
    kill_at("layer-1-committed", args)
    [partial] = partials(tmp_path)
    journal = json.loads((partial / ".resume" / "journal.json").read_text())
    assert journal["layers_done"] == 2 and "model.layers.1.mlp.down_proj.weight" in journal["digests"]

    capsys.readouterr()
    assert run_cli(src, "--sparsity", "0.4", "-o", out, "-q", "--max-shard-size", "60KB", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "--resume: no interrupted run of these options" in err and partial.name in err, err
    assert partials(tmp_path) == [partial]

    # damage a byte of layer 1, which the journal vouches for: refused, not silently resumed
    assert not (partial / "model.safetensors.index.json").exists()  # written only at the end
    shard = next(p for p in sorted(partial.glob("*.safetensors")) if b"layers.1.mlp.down_proj" in p.read_bytes()[:4096])
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert run_cli(*args, "--resume") == 2
    assert "damaged" in capsys.readouterr().err
    assert run_cli(*args) == 0  # starts afresh
    whole = tmp_path / "whole"
    out.rename(whole)
    assert run_cli(*args) == 0
    assert tree_hash(out, RECIPE) == tree_hash(whole, RECIPE)


@pytest.mark.parametrize("fault,resumed", [
    ("tensor:model.layers.1.self_attn.o_proj.weight_bitmask", 1),  # half a compressed part appended
    ("layer-2-written", 2),  # appended past the journalled end: overwritten, then cut off
])
def test_killed_compressed_run_resumes_bit_identical(tiny_with_tokenizer, tmp_path, fault, resumed):
    out, whole = tmp_path / "out", tmp_path / "whole"
    args = [tiny_with_tokenizer, "--sparsity", "0.5", "--save-format", "sparse-bitmask", "-o", out, "-q",
            "--max-shard-size", "100KB"]
    assert run_cli(*args) == 0
    out.rename(whole)
    kill_at(fault, args)
    [partial] = partials(tmp_path)
    assert json.loads((partial / ".resume" / "journal.json").read_text())["writer"]["cursor"]
    assert run_cli(*args) == 0
    assert tree_hash(out, RECIPE) == tree_hash(whole, RECIPE)
    assert not partials(tmp_path)
    assert json.loads((out / "llmprune.json").read_text()).get("resumed_after_layers", 0) == resumed


@pytest.mark.parametrize("pattern,method,fault,resumed", [
    ("channels", "magnitude", "layer-1-committed", 2),
    ("heads", "wanda", "tensor:model.layers.2.self_attn.q_proj.weight", 2),  # states saved after layer 1
    ("layers", "magnitude", "layer-2-written", 2),  # layer 1 or 2 dropped: renumbered names in the journal
    ("hidden", "wanda", "layer-1-committed", 2),  # embedding sliced before layer 0; dimension scores journalled
])
def test_killed_structured_run_resumes_bit_identical(tiny_with_tokenizer, calib_text, tmp_path, pattern, method,
                                                     fault, resumed):
    out, whole = tmp_path / "out", tmp_path / "whole"
    args = [tiny_with_tokenizer, "--pattern", pattern, "--sparsity", "0.5" if pattern != "layers" else "0.25",
            "--method", method, "-o", out, "-q", "--max-shard-size", "100KB",
            "--calib-data", calib_text, "--nsamples", "3", "--seqlen", "32"]
    assert run_cli(*args) == 0
    out.rename(whole)
    kill_at(fault, args)
    assert not out.exists() and len(partials(tmp_path)) == 1
    assert run_cli(*args) == 0
    assert tree_hash(out, RECIPE) == tree_hash(whole, RECIPE)
    assert not partials(tmp_path)
    recipe, reference = (json.loads((f / "llmprune.json").read_text()) for f in (out, whole))
    assert recipe.get("resumed_after_layers", 0) == resumed
    assert recipe["structured"] == reference["structured"] and recipe["sparsity"] == reference["sparsity"]


# Killed before fine-tuning, and after its third layer (the first is surely journalled by then).
@pytest.mark.parametrize("fault", ["finetune", "finetune-layer-2"])
def test_run_killed_while_fine_tuning_resumes_after_its_last_pruned_layer(tiny_with_tokenizer, calib_text, tmp_path,
                                                                          fault):
    out, whole = tmp_path / "out", tmp_path / "whole"
    args = prune_args(tiny_with_tokenizer, out, "wanda", calib_text) + [
        "--finetune-steps", "2", "--finetune-mode", "blockwise", "--finetune-seqlen", "32",
        "--finetune-batch-size", "2", "--finetune-nsamples", "4", "--finetune-data", calib_text]
    assert run_cli(*args) == 0
    out.rename(whole)
    kill_at(fault, args)
    partial = next(p for p in partials(tmp_path) if p.name.startswith(".out.partial-"))  # the prune's, not the fine-tune's
    layers = json.loads((whole / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((partial / ".resume" / "journal.json").read_text())["layers_done"] == layers
    assert run_cli(*args) == 0
    assert tree_hash(out, RECIPE) == tree_hash(whole, RECIPE)
    assert not partials(tmp_path)
    recipe = json.loads((out / "llmprune.json").read_text())
    assert recipe["resumed_after_layers"] == layers and recipe["finetune"]["mask_changes"] == 0
    resumed = recipe["finetune"].get("resumed_after_layers", 0)
    assert resumed == 0 if fault == "finetune" else resumed in (1, 2)
    assert len(recipe["finetune"]["layers"]) == layers


def test_killed_blockwise_finetune_resumes_bit_identical(tiny_with_tokenizer, calib_text, tmp_path):
    """`llmprune finetune` block-wise, dense-model targets: both sets of states come back from the journal."""
    pruned, out, whole = tmp_path / "pruned", tmp_path / "out", tmp_path / "whole"
    assert run_cli(tiny_with_tokenizer, "--sparsity", "0.5", "-o", pruned, "-q") == 0
    args = ["finetune", pruned, "-o", out, "-q", "--mode", "blockwise", "--targets", "dense-model", "--steps", "2",
            "--seqlen", "32", "--batch-size", "2", "--nsamples", "4", "--data", calib_text,
            "--max-shard-size", "100KB"]
    assert run_cli(*args) == 0
    out.rename(whole)
    kill_at("finetune-layer-2", args)
    [partial] = partials(tmp_path)
    assert json.loads((partial / ".resume" / "journal.json").read_text())["layers_done"] in (1, 2)
    assert run_cli(*args) == 0
    assert tree_hash(out, RECIPE) == tree_hash(whole, RECIPE)
    assert not partials(tmp_path)
    ft, reference = (json.loads((f / "llmprune.json").read_text())["finetune"] for f in (out, whole))
    assert ft["resumed_after_layers"] in (1, 2)
    assert [r["mse_after"] for r in ft["layers"]] == [r["mse_after"] for r in reference["layers"]]
