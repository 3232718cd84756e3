"""The packaged SmolLM2-135M-Instruct, a real checkpoint, pruned through the CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli


@pytest.fixture(scope="module")
def smol50(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "smol50"
    assert run_cli("packaged:smollm2", "--sparsity", "0.5", "-o", out, "-q") == 0
    return out


def test_pruned_smollm2_reloads_and_generates(smol50):
    recipe = json.loads((smol50 / "llmprune.json").read_text())
    assert recipe["sparsity"]["overall"] == 0.5
    assert len(recipe["sparsity"]["matrices"]) == 30 * 7
    model = AutoModelForCausalLM.from_pretrained(smol50)
    tok = AutoTokenizer.from_pretrained(smol50)
    assert model.config.tie_word_embeddings
    q = model.model.layers[3].self_attn.q_proj.weight
    assert int((q == 0).sum()) == q.numel() // 2
    ids = tok("The state of the Union is", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 5 and any(c.isalpha() for c in text)


def test_exact_ties_pruned_deterministically(smol50, tmp_path):
    again = tmp_path / "again"
    assert run_cli("packaged:smollm2", "--sparsity", "0.5", "-o", again, "-q") == 0
    assert (again / "model.safetensors").read_bytes() == (smol50 / "model.safetensors").read_bytes()
