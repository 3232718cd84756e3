"""Bad input: one line on stderr, exit code 2, nothing left behind."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import build_tiny, expect_error, run_cli


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], "--sparsity must be a number in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must be a number in [0, 1)"),
    (["--sparsity", "abc"], "invalid float value"),
    ([], "--sparsity is required"),
    (["--pattern", "2:x"], "malformed pattern"),
    (["--pattern", "2.0:4"], "malformed pattern"),
    (["--pattern", "4:4"], "need 0 < N < M"),
    (["--pattern", "2:4", "--sparsity", "0.6"], "contradicts --sparsity 0.6"),
    (["--pattern", "2:4", "--schedule", "linear:0.1"], "--schedule needs unstructured"),
    (["--sparsity", "0.5", "--schedule", "up:1"], "malformed schedule"),
    (["--sparsity", "0.5", "--method", "nope"], "unknown method 'nope'"),
    (["--sparsity", "0.5", "--dtype", "int8"], "--dtype must be one of"),
    (["--sparsity", "0.5", "--device", "cuda"], "no CUDA device"),
    (["--pattern", "3:5"], "not a multiple of M=5"),
])
def test_option_errors(tiny_models, capsys, tmp_path, args, message):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    expect_error(capsys, tmp_path, [tiny_models["llama"], *args], message)


def test_missing_folder(capsys, tmp_path):
    expect_error(capsys, tmp_path, [str(tmp_path / "nope"), "--sparsity", "0.5"], "does not exist")


def test_unknown_hub_id_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    expect_error(capsys, tmp_path, ["no-such-org/no-such-model", "--sparsity", "0.5"], "no-such-org/no-such-model")


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(capsys, tmp_path, [tmp_path / "empty", "--sparsity", "0.5"], "has no config.json")


def test_folder_without_weights(tiny_models, capsys, tmp_path):
    src = tmp_path / "noweights"
    src.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", src)
    expect_error(capsys, tmp_path, [src, "--sparsity", "0.5"], "no safetensors weights")


def test_pickle_only_checkpoint(tiny_models, capsys, tmp_path):
    src = tmp_path / "pickle"
    src.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"not really")
    expect_error(capsys, tmp_path, [src, "--sparsity", "0.5"], "convert them to safetensors")


def test_no_decoder_layers(capsys, tmp_path):
    src = build_tiny("llama", tmp_path / "nolayers", num_hidden_layers=0)
    expect_error(capsys, tmp_path, [src, "--sparsity", "0.5"], "no decoder layers found")


def test_truncated_shard(tiny_models, capsys, tmp_path):
    src = tmp_path / "trunc"
    shutil.copytree(tiny_models["llama"], src)
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    expect_error(capsys, tmp_path, [src, "--sparsity", "0.5"], "truncated")


def test_index_names_missing_tensor(tiny_models, capsys, tmp_path):
    src = tmp_path / "badindex"
    shutil.copytree(tiny_models["llama"], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.ghost.weight"] = first
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(capsys, tmp_path, [src, "--sparsity", "0.5"], "ghost")


@pytest.mark.parametrize("text,message", [("{{", "does not parse"), ('"*.nothing.*": 0.3\n', "matches no prunable matrix")])
def test_bad_ratio_files(tiny_models, capsys, tmp_path, text, message):
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    expect_error(capsys, tmp_path, [tiny_models["llama"], "--sparsity", "0.5", "--ratios", rules], message)


def test_output_not_writable(tiny_models, capsys, tmp_path):
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        target = "/proc/llmprune-out"  # not writable even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "out")
    code = run_cli(tiny_models["llama"], "--sparsity", "0.5", "-o", target, "-q")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot write output" in err, err


def test_output_inside_input_refused(tiny_models, capsys, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    code = run_cli(src, "--sparsity", "0.5", "-o", src / "pruned", "-q")
    err = capsys.readouterr().err
    assert code == 2 and "overlaps the input" in err
    assert not (src / "pruned").exists()


def test_console_script_version_and_help():
    exe = shutil.which("llmprune") or pytest.skip("console script not installed")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("llmprune ")
    helptext = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    assert "examples:" in helptext and "--sparsity" in helptext


def test_console_script_error_has_no_traceback(tmp_path):
    exe = shutil.which("llmprune") or pytest.skip("console script not installed")
    res = subprocess.run([exe, str(tmp_path / "missing"), "--sparsity", "2"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
