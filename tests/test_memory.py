"""--max-memory: parsing, where calibration states go, refusals with numbers, every mode."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tree_hash
from llmprune import devices, sizing
from llmprune.errors import LlmpruneError
from llmprune.sizing import LayerNeeds

GB = 10**9
ROOT = Path(__file__).resolve().parents[1]


def test_parse_budget():
    assert devices.parse_budget("20GB") == {"": 20 * GB}
    assert devices.parse_budget("cpu=8GB, cuda=1.5GB") == {"cpu": 8 * GB, "cuda": 1_500_000_000}
    assert devices.parse_budget(None) == {}
    budget = devices.parse_budget("cpu=8GB,cuda:1=2GB,4GB")
    assert devices.budget_for(budget, torch.device("cuda:1")) == 2 * GB
    assert devices.budget_for(budget, torch.device("cuda:0")) == 4 * GB
    assert devices.budget_for(budget, torch.device("cpu")) == 8 * GB
    for bad, message in (("lots", "cannot read size"), ("gpu=3GB", "unknown device"), ("cpu=0", "not a positive")):
        with pytest.raises(LlmpruneError, match=message):
            devices.parse_budget(bad)


@pytest.fixture
def no_system_limit(monkeypatch):
    """Decisions from the budget alone (and a CUDA device that need not exist)."""
    monkeypatch.setattr(devices, "available_memory", lambda device: None)


NEEDS = LayerNeeds(weights=1 * GB, stats=GB // 2, transient=GB // 4, states=2 * GB)


@pytest.mark.parametrize("budget,store", [
    ("cpu=7.75GB", "cpu"),  # 3 x 1 + 0.5 + 0.25 + 2 x 2 states
    ("cpu=7.74GB", "disk"),
    ("cpu=3.75GB", "disk"),  # one layer's buffers exactly
])
def test_cpu_store(no_system_limit, tmp_path, budget, store):
    got = sizing.activation_store(NEEDS, torch.device("cpu"), devices.parse_budget(budget), tmp_path / "spill")
    assert got == (torch.device("cpu") if store == "cpu" else tmp_path / "spill")


def test_cpu_refusal_names_the_numbers(no_system_limit, tmp_path):
    with pytest.raises(LlmpruneError) as info:
        sizing.activation_store(NEEDS, torch.device("cpu"), devices.parse_budget("3.7GB"), tmp_path)
    assert str(info.value) == ("--max-memory: one decoder layer needs 3.75 GB on cpu (0.50 GB of statistics + "
                               "0.25 GB for one calibration chunk + 3.00 GB for 3 layers in flight), more than the "
                               "3.70 GB allowed")


@pytest.mark.parametrize("budget,store", [
    ("cuda=6.75GB", "cuda"),  # 2 x 1 + 0.5 + 0.25 + 2 x 2 states
    ("cuda=6.7GB,cpu=7GB", "cpu"),
    ("cuda=3GB,cpu=4GB", "disk"),
])
def test_gpu_store(no_system_limit, tmp_path, budget, store):
    got = sizing.activation_store(NEEDS, torch.device("cuda"), devices.parse_budget(budget), tmp_path)
    assert got == {"cuda": torch.device("cuda"), "cpu": torch.device("cpu"), "disk": tmp_path}[store]


def test_gpu_refusal(no_system_limit, tmp_path):
    with pytest.raises(LlmpruneError, match=r"needs 2.75 GB on cuda .* more than the 2.50 GB allowed"):
        sizing.activation_store(NEEDS, torch.device("cuda"), devices.parse_budget("cuda=2.5GB"), tmp_path)


def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_every_mode_refuses_a_budget_below_one_layer(tiny_with_tokenizer, calib_text, capsys, tmp_path):
    src = tiny_with_tokenizer
    capsys.readouterr()
    err = one_line_error(capsys, run_cli(src, "--sparsity", "0.5", "-o", tmp_path / "p", "-q", "--max-memory", "10KB"))
    assert "--max-memory: one decoder layer needs" in err and "on cpu" in err
    err = one_line_error(capsys, run_cli("eval", src, "--data", calib_text, "--seqlen", "16",
                                         "--max-windows", "1", "--max-memory", "10KB", "-q"))
    assert "--max-memory: streamed evaluation needs" in err
    err = one_line_error(capsys, run_cli("finetune", src, "-o", tmp_path / "f", "--steps", "1", "--seqlen", "16",
                                         "--max-memory", "cpu=10KB", "-q"))
    assert "--max-memory: block-wise fine-tuning of one layer needs" in err
    assert [p.name for p in tmp_path.iterdir()] == []


def test_eval_streams_when_the_budget_is_below_the_model(tiny_with_tokenizer, calib_text, tmp_path):
    from llmprune.perplexity import evaluate, load_windows

    windows = load_windows(str(tiny_with_tokenizer), str(calib_text), 16, 2)
    whole = evaluate(str(tiny_with_tokenizer), windows=windows, progress=False)
    small = evaluate(str(tiny_with_tokenizer), windows=windows, progress=False, max_memory="8MB")
    assert (whole.mode, small.mode) == ("whole", "streamed")
    assert small.perplexity == pytest.approx(whole.perplexity, rel=1e-5)


def test_states_spilled_to_disk_give_the_same_model_and_resume(tiny_with_tokenizer, calib_text, tmp_path, caplog):
    from llmprune.config import PruneConfig
    from llmprune.sizing import layer_needs
    from llmprune.source import open_source

    out = tmp_path / "out"
    args = [tiny_with_tokenizer, "--method", "wanda", "--sparsity", "0.5", "--calib-data", calib_text, "--nsamples",
            "3", "--seqlen", "32", "-o", out, "-q", "--max-shard-size", "100KB"]
    cfg = PruneConfig(model=str(tiny_with_tokenizer), method="wanda", sparsity=0.5, nsamples=3, seqlen=32)
    needs = layer_needs(cfg, open_source(str(tiny_with_tokenizer)))
    assert needs.states == 3 * 32 * 64 * 4
    one_layer = needs.stats + needs.transient + 3 * needs.weights
    assert run_cli(*args) == 0
    whole = tmp_path / "whole"
    out.rename(whole)

    spilled = [*args, "--max-memory", f"cpu={one_layer + needs.states}"]  # below one layer + 2 x states
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMPRUNE_FAULT_AT": "layer-1-committed"}
    res = subprocess.run([sys.executable, "-m", "llmprune.cli", *map(str, spilled)], env=env, capture_output=True,
                         text=True)
    assert res.returncode == -9, res.stderr[-2000:]
    [partial] = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert sorted(p.name for p in (partial / ".resume" / "states-1").iterdir()) == ["chunk-0.pt"]
    assert list((partial / ".resume" / "spill").glob("g*-0.pt")), "states were not spilled to disk"
    with caplog.at_level(logging.INFO, logger="llmprune"):
        assert run_cli(*spilled) == 0
    assert "kept on disk" in caplog.text
    # the model card and recipe hold the command, which here differs by --max-memory
    assert tree_hash(out, ("llmprune.json", "README.md")) == tree_hash(whole, ("llmprune.json", "README.md"))
