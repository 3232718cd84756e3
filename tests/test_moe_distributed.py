"""Whole-model fine-tuning of a pruned mixture-of-experts model on two CPU processes (DDP and FSDP):
the same trajectory as one process, every expert matrix trained with its zeros kept, routers frozen."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_moe import tensors, tokenized


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ARGS = ["--mode", "whole", "--steps", "4", "--lr", "1e-2", "--seqlen", "32", "--batch-size", "2", "--grad-accum", "2",
        "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def pruned_and_one(tmp_path_factory, calib_text) -> tuple[Path, Path]:
    """A tiny Qwen3-MoE pruned to 2:4 (experts included), and its single-process fine-tune."""
    root = tmp_path_factory.mktemp("moe-dist")
    src = tokenized("qwen3_moe", root / "dense")
    pruned, one = root / "pruned", root / "one"
    assert run_cli(src, "--pattern", "2:4", "-o", pruned, "-q") == 0
    assert run_cli("finetune", pruned, "-o", one, *ARGS, "--data", calib_text) == 0
    return pruned, one


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_experts_as_one(pruned_and_one, calib_text, tmp_path, strategy):
    pruned, one_dir = pruned_and_one
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "llmprune.cli", "finetune", str(pruned), "-o", str(tmp_path / "two"), *ARGS, "--data", str(calib_text),
           "--distributed", strategy]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((one_dir / "llmprune.json").read_text())["finetune"]
    two = json.loads((tmp_path / "two" / "llmprune.json").read_text())["finetune"]
    assert two["processes"] == 2 and two["config"]["distributed"] == strategy
    # same global batch, same windows: the same trajectory up to float reduction order
    assert two["loss"]["first"] == pytest.approx(one["loss"]["first"], rel=1e-4)
    assert two["loss"]["last"] == pytest.approx(one["loss"]["last"], rel=1e-2)
    before, after = tensors(pruned), tensors(tmp_path / "two")
    assert set(after) == set(before)
    experts = [n for n in before if ".experts." in n and not n.endswith("bias")]
    assert experts
    for name in experts:
        assert torch.equal(after[name] == 0, before[name] == 0), name  # 2:4 zeros kept, none added
    assert all(not torch.equal(after[n], before[n]) for n in experts)  # every expert matrix trained
    routers = [n for n in before if n.endswith("mlp.gate.weight")]
    assert routers and all(torch.equal(after[n], before[n]) for n in routers)
