"""What a first-time user runs into, through the CLI and the Python API: text encodings, tokenizers,
two runs on one output, inspecting a compressed save, the API's options, and the messages and
model card a local input gets."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TOKENIZER_FILES, build_tiny, expect_error, run_cli

import llmprune
from llmprune.claims import OutputClaim
from llmprune.errors import LlmpruneError

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9 \u00e0 la fa\u00e7ade: \u00a3 and \u00b0 signs. " * 60
CALIB = ("--method", "wanda", "--nsamples", "2", "--seqlen", "32")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """tok: a tiny Llama with SmolLM2's tokenizer (49152 tokens); bare: the same weights without a
    tokenizer; small: a 128-token Llama given SmolLM2's (larger) tokenizer."""
    from llmprune.packaged import smollm2_checkpoint

    root = tmp_path_factory.mktemp("newuser")
    tok = build_tiny("llama", root / "tok", vocab_size=49152, tie_word_embeddings=True, shard="100MB")
    small = build_tiny("llama", root / "small")
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_checkpoint() / name, tok / name)
        shutil.copy(smollm2_checkpoint() / name, small / name)
    bare = root / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tok / name, bare / name)
    return {"tok": tok, "bare": bare, "small": small}


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------- text encodings


def test_latin1_and_utf16_text_tokenise_as_the_utf8_text(models, tmp_path, capsys):
    """The same text in three encodings gives the same perplexity: each was decoded to the same string."""
    files = {"utf8.txt": TEXT.encode("utf-8"), "latin1.txt": TEXT.encode("latin-1"), "utf16.txt": TEXT.encode("utf-16")}
    results = {}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        capsys.readouterr()
        assert run_cli("eval", models["tok"], "--data", tmp_path / name, "--seqlen", "32", "--max-windows", "2",
                       "-q") == 0
        results[name] = capsys.readouterr().out.strip()
    assert results["latin1.txt"] == results["utf8.txt"] == results["utf16.txt"], results


def test_latin1_calibration_text(models, tmp_path):
    (tmp_path / "latin1.txt").write_bytes(TEXT.encode("latin-1"))
    assert run_cli(models["tok"], "--sparsity", "0.5", *CALIB, "--calib-data", tmp_path / "latin1.txt",
                   "-o", tmp_path / "out", "-q") == 0
    recipe = json.loads((tmp_path / "out" / "llmprune.json").read_text())
    assert recipe["calibration"]["nsamples"] == 2 and recipe["sparsity"]["overall"] == 0.5


def test_read_text_decodes_windows_1252():
    from llmprune.data import read_text

    # 0x80 is the euro sign in Windows-1252 (a control character in Latin-1)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"cp1252-{os.getpid()}.txt"
    path.write_bytes("price: 5 \u20ac, caf\u00e9".encode("cp1252"))
    try:
        assert read_text(path) == "price: 5 \u20ac, caf\u00e9"
    finally:
        path.unlink()


@pytest.mark.parametrize("raw", [bytes(range(256)) * 8, bytes(b for b in range(1, 256)) * 8],
                         ids=["with-nul", "control-bytes"])
def test_binary_text_is_refused(models, tmp_path, capsys, raw):
    binary = tmp_path / "data.txt"
    binary.write_bytes(raw)
    message = f"llmprune: error: {binary} is not a text file (it holds binary data): give UTF-8, UTF-16 or Latin-1 text"
    out = tmp_path / "out"
    assert run_cli(models["tok"], "--sparsity", "0.5", *CALIB, "--calib-data", binary, "-o", out, "-q") == 2
    assert one_error(capsys) == message
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert run_cli("eval", models["tok"], "--data", binary, "--seqlen", "32", "-q") == 2
    assert one_error(capsys) == message
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(raw)
    assert run_cli("eval", models["tok"], "--data", jsonl, "--seqlen", "32", "-q") == 2
    assert one_error(capsys) == message.replace("data.txt", "data.jsonl")


# ------------------------------------------------------------------------------- tokenizers


def test_calibration_without_a_tokenizer_names_the_option(models, tmp_path, capsys):
    expect_error(capsys, tmp_path, [models["bare"], "--sparsity", "0.5", *CALIB],
                 f"{models['bare'].resolve()} has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json): "
                 "pass --tokenizer PATH_OR_ID")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_for_calibration(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(models["small"], "--sparsity", "0.5", *CALIB, "-o", out, "-q") == 2
    err = one_error(capsys)
    assert re.fullmatch(r"llmprune: error: token ids must lie in \[0, 128\), the model's vocabulary; got \[\d+, \d+\]: "
                        r"the tokenizer does not belong to this model", err), err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # the same check as eval's
    assert run_cli("eval", models["small"], "--seqlen", "32", "--max-windows", "1", "-q") == 2
    assert "token ids must lie in [0, 128), the model's vocabulary" in one_error(capsys)


def test_tokenizer_option_for_a_folder_without_one(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(models["bare"], "--sparsity", "0.5", *CALIB, "--tokenizer", models["tok"], "-o", out, "-q") == 0
    recipe = json.loads((out / "llmprune.json").read_text())
    assert recipe["config"]["tokenizer"] == str(models["tok"])
    assert (out / "tokenizer.json").is_file()  # the output carries the tokenizer it was calibrated with
    capsys.readouterr()
    assert run_cli("eval", out, "--seqlen", "32", "--max-windows", "2", "-q") == 0
    pruned = float(capsys.readouterr().out)
    assert run_cli("eval", models["bare"], "--tokenizer", "packaged:smollm2", "--seqlen", "32", "--max-windows", "2",
                   "-q") == 0
    dense = float(capsys.readouterr().out)
    assert run_cli("eval", models["tok"], "--seqlen", "32", "--max-windows", "2", "-q") == 0
    assert dense == float(capsys.readouterr().out)  # same weights, same tokenizer: same windows
    assert pruned != dense


def test_the_tokenizer_option_is_recorded_only_when_set(models, tmp_path):
    assert run_cli(models["tok"], "--sparsity", "0.5", "-o", tmp_path / "out", "-q") == 0
    assert "tokenizer" not in json.loads((tmp_path / "out" / "llmprune.json").read_text())["config"]


# ------------------------------------------------------------------------------- one writer per output


def test_a_second_writer_is_refused_while_the_first_runs(models, tmp_path, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMPRUNE_FAULT_AT": "layer-1-committed",
           "LLMPRUNE_FAULT_ACTION": "stop"}
    first = subprocess.Popen([sys.executable, "-m", "llmprune.cli", str(models["tok"]), "--sparsity", "0.5", "-o",
                              str(out), "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # returns once the first run stopped mid-way
        assert os.WIFSTOPPED(status), "the first run ended before its fault point"
        capsys.readouterr()
        for options in (["--sparsity", "0.3"], ["--sparsity", "0.5"], ["--sparsity", "0.3", "--overwrite"]):
            assert run_cli(models["tok"], *options, "-o", out, "-q") == 2
            assert one_error(capsys) == (f"llmprune: error: another llmprune run is writing {out}: wait for it to "
                                         "finish or choose another output")
        assert len(list(tmp_path.glob(".out.partial-*"))) == 1  # the first run's alone
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads((out / "llmprune.json").read_text())["config"]["sparsity"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no claim, partial or old folder left


def test_an_output_finished_meanwhile_is_not_replaced(models, tmp_path, capsys, monkeypatch):
    """A run that checked the output before another run finished it refuses under its claim."""
    from llmprune import pruning

    out = tmp_path / "out"
    assert run_cli(models["tok"], "--sparsity", "0.5", "-o", out, "-q") == 0
    before = (out / "llmprune.json").read_bytes()
    monkeypatch.setattr(pruning, "check_output", lambda *args: None)  # as if checked before it existed
    capsys.readouterr()
    assert run_cli(models["tok"], "--sparsity", "0.3", "-o", out, "-q") == 2
    assert one_error(capsys) == f"llmprune: error: output {out} exists and is not empty (use --overwrite to replace it)"
    assert (out / "llmprune.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert run_cli(models["tok"], "--sparsity", "0.3", "-o", out, "-q", "--overwrite") == 0
    assert json.loads((out / "llmprune.json").read_text())["config"]["sparsity"] == 0.3


def test_decompress_sweep_and_sensitivity_respect_a_claim(models, tmp_path, capsys):
    sparse_out = tmp_path / "sparse"
    assert run_cli(models["tok"], "--pattern", "2:4", "--save-format", "sparse-bitmask", "-o", sparse_out, "-q") == 0
    out = tmp_path / "out"
    with OutputClaim(out):
        capsys.readouterr()
        for args in (["decompress", sparse_out, out, "-q"],
                     ["sensitivity", models["tok"], "-o", out, "--nsamples", "2", "--seqlen", "32", "-q"]):
            assert run_cli(*args) == 2
            assert one_error(capsys) == (f"llmprune: error: another llmprune run is writing {out}: wait for it to "
                                         "finish or choose another output")
    assert not out.exists()
    assert run_cli("decompress", sparse_out, out, "-q") == 0  # released


# ------------------------------------------------------------------------------- inspect


def test_inspect_reads_a_sparse_bitmask_save(models, tmp_path, capsys):
    reports = {}
    for fmt in ("dense", "sparse-bitmask"):
        out = tmp_path / fmt
        assert run_cli(models["tok"], "--pattern", "2:4", "--save-format", fmt, "-o", out, "-q") == 0
        capsys.readouterr()
        assert run_cli("inspect", out, "--json", "-q") == 0
        reports[fmt] = json.loads(capsys.readouterr().out)
    dense, packed = reports["dense"], reports["sparse-bitmask"]
    assert len(packed["matrices"]) == 21  # 3 layers x 7 linears
    assert packed["totals"]["prunable_sparsity"] == 0.5
    assert packed["totals"]["n_m"] == {"2:4": True, "4:8": True}
    assert [layer["sparsity"] for layer in packed["layers"]] == [0.5, 0.5, 0.5]
    for key in ("matrices", "layers", "totals", "other_params", "dtypes"):
        assert packed[key] == dense[key], key
    capsys.readouterr()
    assert run_cli("inspect", tmp_path / "sparse-bitmask", "-q") == 0
    text = capsys.readouterr().out
    assert "3, 21 prunable matrices" in text and "N:M valid  2:4, 4:8" in text


# ------------------------------------------------------------------------------- the Python API


def test_api_prune_with_keywords_writes_a_reproducible_recipe(models, tmp_path):
    out = tmp_path / "out"
    recipe = llmprune.prune(str(models["tok"]), sparsity=0.5, method="wanda", nsamples=2, seqlen=32,
                            output=str(out), progress=False)
    assert recipe["sparsity"]["overall"] == 0.5 and recipe["output"] == str(out)
    command = f"llmprune {models['tok']} --sparsity 0.5 -o {out} --method wanda --nsamples 2 --seqlen 32"
    assert recipe["command"] == command
    assert json.loads((out / "llmprune.json").read_text())["command"] == command
    card = (out / "README.md").read_text()
    assert "## Reproduce\n\n```\nllmprune tok --sparsity 0.5 -o out --method wanda --nsamples 2 --seqlen 32\n```" in card
    # the recorded command reproduces the same weights
    again = tmp_path / "again"
    argv = command.split()[1:]
    argv[argv.index("-o") + 1] = str(again)
    assert run_cli(*argv, "-q") == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_api_errors_name_keywords(models, tmp_path):
    with pytest.raises(LlmpruneError) as err:
        llmprune.prune(str(models["tok"]), output=str(tmp_path / "out"))
    assert str(err.value) == "sparsity= is required (a number in [0, 1), e.g. 0.5)"
    with pytest.raises(LlmpruneError) as err:
        llmprune.prune(str(models["tok"]), sparsity=0.5, calib_data="nonesuch", method="wanda",
                       output=str(tmp_path / "out"))
    assert str(err.value) == "unknown dataset 'nonesuch': expected sotu, wikitext2, c4, auto or an existing path"
    with pytest.raises(LlmpruneError) as err:
        llmprune.evaluate(str(models["tok"]), seqlen=1)
    assert str(err.value) == "seqlen= must be an integer >= 2, got 1"
    with pytest.raises(TypeError, match=r"prune\(\) got unexpected option\(s\) sparsiti; it takes: "):
        llmprune.prune(str(models["tok"]), sparsiti=0.5)
    assert not (tmp_path / "out").exists()


def test_api_accepts_config_objects_and_the_eval_options(models, tmp_path):
    from llmprune.config import PruneConfig

    recipe = llmprune.prune(PruneConfig(model=str(models["tok"]), sparsity=0.25, output=str(tmp_path / "out")),
                            progress=False)
    assert recipe["sparsity"]["overall"] == 0.25
    assert recipe["command"] == f"llmprune {models['tok']} --sparsity 0.25 -o {tmp_path / 'out'}"
    result = llmprune.evaluate(str(tmp_path / "out"), data="sotu", seqlen=32, max_windows=2,
                               json=str(tmp_path / "ppl.json"), progress=False)
    report = json.loads((tmp_path / "ppl.json").read_text())
    assert report["perplexity"] == result.perplexity and result.windows == 2
    assert report["command"] == f"llmprune eval {tmp_path / 'out'} --data sotu --seqlen 32 --max-windows 2 --json " \
                                f"{tmp_path / 'ppl.json'}"


# ------------------------------------------------------------------------------- messages and the card


def test_channels_targets_only_the_mlp(models, tmp_path):
    out = tmp_path / "out"
    assert run_cli(models["tok"], "--pattern", "channels", "--sparsity", "0.3", "-o", out, "-q") == 0
    sparsity = json.loads((out / "llmprune.json").read_text())["sparsity"]
    for name, m in sparsity["matrices"].items():
        if ".mlp." in name:
            assert m["target"] == 0.3 and m["achieved"] > 0, name
        else:
            assert m["target"] == 0.0 and m["achieved"] == 0.0, name
    assert sparsity["matrices_pruned"] == 9  # gate, up, down in 3 layers


def test_nsamples_zero_is_accepted_without_calibration(models, tmp_path, capsys):
    assert run_cli(models["tok"], "--sparsity", "0.5", "--nsamples", "0", "-o", tmp_path / "magnitude", "-q") == 0
    expect_error(capsys, tmp_path, [models["tok"], "--sparsity", "0.5", "--method", "wanda", "--nsamples", "0"],
                 "--nsamples must be an integer >= 1, got 0")


def test_offline_mode_is_named_for_an_unknown_model(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    expect_error(capsys, tmp_path, ["nobody-here/no-such-model", "--sparsity", "0.5"],
                 "model 'nobody-here/no-such-model' is neither a local folder nor in the Hugging Face cache, and "
                 "offline mode (HF_HUB_OFFLINE=1) forbids downloading it")


@pytest.mark.parametrize("args,option", [(["--method", "wanda", "--calib-data", "c4"], "--calib-data"),
                                         (["--eval", "wikitext2", "--eval-seqlen", "32"], "--eval")])
def test_offline_datasets_name_the_prune_options(models, tmp_path, args, option):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    res = subprocess.run([sys.executable, "-m", "llmprune.cli", str(models["tok"]), "--sparsity", "0.5", *args,
                          "--nsamples", "2", "--seqlen", "32", "-o", str(tmp_path / "out"), "-q"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("llmprune: error: cannot load dataset ")
    assert res.stderr.strip().endswith(f"; pass a local path or use {option} sotu")


def test_card_of_a_local_input_publishes_no_local_path(models, tmp_path):
    model = tmp_path / "inputs" / "my-model"
    shutil.copytree(models["tok"], model)
    (tmp_path / "rules.yaml").write_text('"*.mlp.down_proj.weight": 0.6\n')
    out = tmp_path / "out"
    assert run_cli(model, "--sparsity", "0.5", "--ratios", tmp_path / "rules.yaml", *CALIB, "--calib-data", "sotu",
                   "-o", out, "-q") == 0
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card
    assert "base_model" not in card.split("---")[1]  # nothing says which Hub model it derives from
    assert "This model is `my-model` with" in card
    assert ("llmprune my-model --sparsity 0.5 -o out --method wanda --ratios rules.yaml --calib-data sotu --nsamples 2 "
            "--seqlen 32\n") in card

    # the input's config names the Hub model it was saved from: that becomes base_model
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    assert run_cli(model, "--sparsity", "0.5", "-o", tmp_path / "out2", "-q") == 0
    card = (tmp_path / "out2" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M\n" in card
    assert "[HuggingFaceTB/SmolLM2-135M](https://huggingface.co/HuggingFaceTB/SmolLM2-135M)" in card
    assert str(tmp_path) not in card

    # a local path there is never published
    (model / "config.json").write_text(json.dumps({**config, "_name_or_path": str(tmp_path / "elsewhere")}))
    assert run_cli(model, "--sparsity", "0.5", "-o", tmp_path / "out3", "-q") == 0
    card = (tmp_path / "out3" / "README.md").read_text()
    assert "base_model" not in card and str(tmp_path) not in card


def test_sweep_chart_title_names_the_model_not_its_path(models, tmp_path, monkeypatch):
    from llmprune import plots

    titles = []
    real = plots.sweep_lines
    monkeypatch.setattr(plots, "sweep_lines", lambda points, dense, path, title: titles.append(title) or
                        real(points, dense, path, title))
    assert run_cli("sweep", models["tok"], "--sparsities", "0.5", "--methods", "magnitude", "--eval", "sotu",
                   "--eval-seqlen", "32", "--eval-max-windows", "2", "-o", tmp_path / "sweep", "-q") == 0
    assert titles == ["tok (unstructured): perplexity on sotu"]
