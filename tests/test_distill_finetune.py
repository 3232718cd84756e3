"""Distillation fine-tuning end to end: the teacher beside the student or as a top-k file computed
layer by layer, SquareHead hidden-state matching, every pruning structure kept, the sparse-bitmask
format kept, several processes, and one-line errors for a teacher that is not the student's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import build_tiny, run_cli
from conftest import expect_error as conftest_expect_error
from llmprune.config import FinetuneConfig
from llmprune.distill import topk_teacher
from llmprune.finetuning.teacher import precompute_topk
from llmprune.masks import is_n_m
from llmprune.sizing import WHOLE_MODEL_SHARE, choose_teacher, teacher_bytes, training_bytes
from llmprune.source import open_source

VOCAB = 49152  # the tiny models share SmolLM2's tokenizer


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output, sparse-bitmask matrices decompressed (llmprune's own reader)."""
    src = open_source(str(folder))
    try:
        return {name: src.checkpoint.read(name) for name in src.checkpoint.names}
    finally:
        src.checkpoint.close()


def linears(folder: Path) -> list[str]:
    src = open_source(str(folder))
    src.checkpoint.close()
    return [name for i in range(src.layout.num_layers) for _, name in src.layout.linear_names(i)]


def finetune_args(calib_text, *extra) -> list:
    return ["--mode", "whole", "--steps", "2", "--batch-size", "2", "--nsamples", "2", "--seqlen", "16",
            "--data", calib_text, "--lr", "1e-3", "--device", "cpu", "-q", *extra]


def recipe_of(folder: Path) -> dict:
    return json.loads((folder / "llmprune.json").read_text())


def assert_kept(before: Path, after: Path) -> None:
    """Same tensor names and shapes, and every prunable matrix zero exactly where it was."""
    a, b = weights(before), weights(after)
    assert {n: t.shape for n, t in a.items()} == {n: t.shape for n, t in b.items()}
    changed = 0
    for name in linears(before):
        assert torch.equal(a[name] == 0, b[name] == 0), name
        changed += int((a[name] != b[name]).sum())
    assert changed > 0  # it did train


@pytest.fixture(scope="module")
def pruned(tiny_with_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "pruned"
    assert run_cli(tiny_with_tokenizer, "--sparsity", "0.5", "-o", out, "-q") == 0
    return out


# --------------------------------------------------------------------------------------------
# The loss: zero on the teacher itself, and the top-k file against the live teacher


@pytest.mark.parametrize("mode", ["live", "topk"])
def test_loss_is_zero_when_the_student_is_the_teacher(tiny_with_tokenizer, calib_text, tmp_path, mode):
    out = tmp_path / "ft"
    assert run_cli("finetune", tiny_with_tokenizer, "-o", out, "--loss", "distill", "--dense", tiny_with_tokenizer,
                   "--teacher-mode", mode, *finetune_args(calib_text, "--steps", "1")) == 0
    ft = recipe_of(out)["finetune"]
    assert ft["teacher"]["mode"] == mode
    assert abs(ft["loss"]["first"]) < 1e-5  # float16 rounding of the top-k file's log-probabilities


def test_topk_file_covering_the_vocabulary_gives_the_live_loss(pruned, tiny_with_tokenizer, calib_text, tmp_path):
    """Live teacher and a top-k file with k = V: the same first loss within the float16 rounding of
    the stored log-probabilities (relative 2e-3), the same trajectory; k = 100 gives a lower bound
    (the top-k KL never exceeds the full one). The file is gone once the run is written."""
    runs = {}
    for name, extra in {"live": ["--teacher-mode", "live"], "all": ["--teacher-mode", "topk", "--teacher-topk", str(VOCAB)],
                        "top100": ["--teacher-mode", "topk", "--teacher-topk", "100"]}.items():
        out = tmp_path / name
        assert run_cli("finetune", pruned, "-o", out, "--loss", "distill", *finetune_args(calib_text, *extra)) == 0
        runs[name] = recipe_of(out)["finetune"]
        assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    live, full, top = runs["live"]["loss"], runs["all"]["loss"], runs["top100"]["loss"]
    assert live["first"] > 1e-3
    assert full["first"] == pytest.approx(live["first"], rel=2e-3)
    assert full["last"] == pytest.approx(live["last"], rel=1e-2)
    assert top["first"] <= live["first"] * (1 + 2e-3)
    teacher = runs["all"]["teacher"]
    assert teacher["mode"] == "topk" and teacher["k"] == VOCAB and teacher["reused"] is False
    assert teacher["file_bytes"] == 2 * 16 * (6 * VOCAB + 2) == teacher["estimate_file_bytes"]
    assert teacher["memory_estimate_bytes"] > 0 and teacher["peak_rss_mb"] > 0
    assert runs["live"]["teacher"]["mode"] == "live" and runs["live"]["teacher"]["weights_bytes"] > 0
    card = (tmp_path / "all" / "README.md").read_text()
    assert f"top-{VOCAB} distribution precomputed layer by layer" in card
    assert "the teacher ran beside the student" in (tmp_path / "live" / "README.md").read_text()
    assert_kept(pruned, tmp_path / "all")


def test_streamed_topk_file_is_the_whole_models_topk(tiny_with_tokenizer, tmp_path):
    """The layer-by-layer pass gives the teacher's own top-k: same tokens, same log-probabilities."""
    dense = open_source(str(tiny_with_tokenizer))
    windows = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    cfg = FinetuneConfig(model="unused", teacher_topk=5, temperature=2.0)
    try:
        top, report = precompute_topk(dense, windows, cfg, torch.device("cpu"), "fp32", tmp_path / "topk", False)
        again, second = precompute_topk(dense, windows, cfg, torch.device("cpu"), "fp32", tmp_path / "topk", False)
    finally:
        dense.checkpoint.close()
    assert report["reused"] is False and second["reused"] is True and again.k == 5
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer).eval()(windows).logits
    want = topk_teacher(logits, 5, 2.0, dtype=torch.float32)
    got = top.rows(torch.tensor([0, 1, 2]), torch.device("cpu"))
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.logprobs.float(), want.logprobs, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.rest.float(), want.rest, rtol=2e-3, atol=2e-3)
    picked = top.rows(torch.tensor([2, 0]), torch.device("cpu"))  # rows read by index, in that order
    assert torch.equal(picked.indices, want.indices[[2, 0]])


def test_auto_runs_the_teacher_alongside_only_when_both_fit(pruned, tiny_with_tokenizer):
    student, dense = open_source(str(pruned)), open_source(str(tiny_with_tokenizer))
    try:
        cfg = FinetuneConfig(model=str(pruned), loss="distill", batch_size=2)
        alone = training_bytes(student, cfg, 16)
        both = training_bytes(student, cfg, 16, teacher_bytes(dense, cfg, 16))
        assert both - alone == teacher_bytes(dense, cfg, 16) > 4 * 49152 * 64  # at least its float32 embeddings
        fits = FinetuneConfig(**{**cfg.to_dict(), "max_memory": f"{int(both / WHOLE_MODEL_SHARE) + 1}B"})
        tight = FinetuneConfig(**{**cfg.to_dict(), "max_memory": f"{int(both / WHOLE_MODEL_SHARE) - 1}B"})
        cpu = torch.device("cpu")
        assert choose_teacher(fits, student, dense, cpu, 16) == "live"
        assert choose_teacher(tight, student, dense, cpu, 16) == "topk"
        hidden = FinetuneConfig(**{**tight.to_dict(), "hidden_weight": 1.0})
        assert choose_teacher(hidden, student, dense, cpu, 16) == "live"  # hidden states need it live
    finally:
        student.checkpoint.close()
        dense.checkpoint.close()


def test_auto_under_a_budget_precomputes_the_topk_file(pruned, tiny_with_tokenizer, calib_text, tmp_path):
    student, dense = open_source(str(pruned)), open_source(str(tiny_with_tokenizer))
    cfg = FinetuneConfig(model=str(pruned), loss="distill", batch_size=2)
    budget = int(training_bytes(student, cfg, 16, teacher_bytes(dense, cfg, 16)) / WHOLE_MODEL_SHARE) - 1
    student.checkpoint.close()
    dense.checkpoint.close()
    out = tmp_path / "ft"
    assert run_cli("finetune", pruned, "-o", out, "--loss", "distill", "--max-memory", f"{budget}B",
                   *finetune_args(calib_text)) == 0
    teacher = recipe_of(out)["finetune"]["teacher"]
    assert teacher["mode"] == "topk" and teacher["k"] == 100 and teacher["states"] == "cpu"


# --------------------------------------------------------------------------------------------
# SquareHead hidden-state matching


def test_hidden_state_matching_brings_the_layers_closer(pruned, tiny_with_tokenizer, calib_text, tmp_path):
    from llmprune.data import calibration_samples
    from llmprune.distill import hidden_mse
    from llmprune.source import load_tokenizer

    out = tmp_path / "ft"
    assert run_cli("finetune", pruned, "-o", out, "--loss", "distill", "--hidden-weight", "1",
                   *finetune_args(calib_text, "--steps", "6")) == 0
    ft = recipe_of(out)["finetune"]
    assert ft["teacher"]["mode"] == "live" and ft["teacher"]["hidden_weight"] == 1.0
    assert ft["loss"]["last"] < ft["loss"]["first"]
    assert_kept(pruned, out)
    ids = calibration_samples(load_tokenizer(pruned), str(calib_text), 2, 16, 0)  # the training windows
    with torch.no_grad():
        states = {k: AutoModelForCausalLM.from_pretrained(f).eval()(ids, output_hidden_states=True).hidden_states[1:]
                  for k, f in (("dense", tiny_with_tokenizer), ("pruned", pruned), ("ft", out))}
    assert float(hidden_mse(states["ft"], states["dense"])) < float(hidden_mse(states["pruned"], states["dense"]))


# --------------------------------------------------------------------------------------------
# Every structure kept


@pytest.mark.parametrize("prune,teacher", [
    (["--pattern", "2:4"], "topk"),
    (["--pattern", "channels", "--sparsity", "0.25"], "live"),
    (["--pattern", "heads", "--sparsity", "0.5"], "topk"),
    (["--pattern", "layers", "--sparsity", "0.34", "--calib-data", "sotu", "--nsamples", "2", "--seqlen", "16"], "live"),
])
def test_distillation_keeps_every_structure(tiny_with_tokenizer, calib_text, tmp_path, prune, teacher):
    """N:M and unstructured zeros unchanged, structured outputs keep their (smaller) shapes; the
    teacher is the dense model, whose shapes differ."""
    pruned, out = tmp_path / "pruned", tmp_path / "ft"
    assert run_cli(tiny_with_tokenizer, *prune, "-o", pruned, "-q") == 0
    assert run_cli("finetune", pruned, "-o", out, "--loss", "distill", "--teacher-mode", teacher,
                   *finetune_args(calib_text)) == 0
    assert_kept(pruned, out)
    assert recipe_of(out)["finetune"]["mask_changes"] == 0
    if prune[1] == "2:4":
        after = weights(out)
        assert all(is_n_m(after[name], 2, 4) for name in linears(out))
    assert json.loads((out / "config.json").read_text()) == json.loads((pruned / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(out)


def test_hidden_matching_refused_when_layers_were_removed(tiny_with_tokenizer, calib_text, capsys, tmp_path):
    pruned = tmp_path / "pruned"
    assert run_cli(tiny_with_tokenizer, "--pattern", "layers", "--sparsity", "0.34", "--calib-data", "sotu",
                   "--nsamples", "2", "--seqlen", "16", "-o", pruned, "-q") == 0
    conftest_expect_error(capsys, tmp_path, ["finetune", pruned, "--loss", "distill", "--hidden-weight", "1",
                                             *finetune_args(calib_text)[:-1]],
                          "the student has 2 layers of width 64 and the teacher 3 of width 64")


# --------------------------------------------------------------------------------------------
# Save format, optimisers, processes


@pytest.mark.parametrize("mode", ["whole", "blockwise"])
def test_sparse_bitmask_input_stays_sparse_bitmask(tiny_with_tokenizer, calib_text, tmp_path, mode):
    pruned, out = tmp_path / "pruned", tmp_path / "ft"
    assert run_cli(tiny_with_tokenizer, "--sparsity", "0.5", "--save-format", "sparse-bitmask", "-o", pruned, "-q") == 0
    args = finetune_args(calib_text) if mode == "whole" else \
        ["--mode", "blockwise", "--steps", "2", "--nsamples", "2", "--seqlen", "16", "--batch-size", "1",
         "--data", calib_text, "--lr", "1e-3", "--device", "cpu", "-q"]
    assert run_cli("finetune", pruned, "-o", out, *args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity_config"]["format"] == "sparse-bitmask"
    assert sorted(config["sparsity_config"]["compressed"]) == sorted(linears(pruned))
    stored = load_file(out / "model.safetensors")
    assert all(f"{name}_bitmask" in stored and name not in stored for name in linears(pruned))
    save = recipe_of(out)["save"]
    assert save["format"] == "sparse-bitmask" and save["bytes"] < save["dense_bytes"]
    assert_kept(pruned, out)


def test_prune_with_finetune_writes_sparse_bitmask(tiny_with_tokenizer, calib_text, tmp_path):
    dense, out = tmp_path / "dense", tmp_path / "out"
    assert run_cli(tiny_with_tokenizer, "--sparsity", "0.5", "-o", dense, "-q") == 0
    assert run_cli(tiny_with_tokenizer, "--sparsity", "0.5", "--save-format", "sparse-bitmask", "--finetune-steps", "2",
                   "--finetune-loss", "distill", "--finetune-seqlen", "16", "--finetune-batch-size", "2",
                   "--finetune-nsamples", "2", "--finetune-data", calib_text, "-o", out, "-q") == 0
    recipe = recipe_of(out)
    assert recipe["save"]["format"] == "sparse-bitmask" and recipe["finetune"]["mask_changes"] == 0
    assert recipe["finetune"]["teacher"]["mode"] == "live"
    assert json.loads((out / "config.json").read_text())["sparsity_config"]["format"] == "sparse-bitmask"
    assert_kept(dense, out)  # the same zeros as the same prune saved dense, and trained
    assert "sparse-bitmask" in (out / "README.md").read_text()  # the card says how to load it


def test_adamw8bit_distillation_keeps_the_mask(pruned, calib_text, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "ft"
    assert run_cli("finetune", pruned, "-o", out, "--loss", "lm+distill", "--optim", "adamw8bit",
                   "--teacher-mode", "topk", *finetune_args(calib_text)) == 0
    assert recipe_of(out)["finetune"]["config"]["optim"] == "adamw8bit"
    assert_kept(pruned, out)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy,teacher", [("ddp", "topk"), ("fsdp", "live")])
def test_two_processes_distil_as_one(pruned, calib_text, tmp_path, strategy, teacher):
    """Same global batch, same windows: the trajectory of one process up to float reduction order
    (the top-k file covers the vocabulary: on this random model a top-100 KL is ~1e-6, all noise)."""
    args = [*finetune_args(calib_text, "--steps", "3"), "--loss", "distill", "--teacher-mode", teacher,
            "--teacher-topk", str(VOCAB)]
    assert run_cli("finetune", pruned, "-o", tmp_path / "one", *args) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "llmprune.cli", "finetune", str(pruned), "-o", str(tmp_path / "two"), *map(str, args),
           "--distributed", strategy]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = recipe_of(tmp_path / "one")["finetune"], recipe_of(tmp_path / "two")["finetune"]
    assert two["processes"] == 2 and two["teacher"]["mode"] == teacher
    assert two["loss"]["first"] == pytest.approx(one["loss"]["first"], rel=1e-4)
    assert two["loss"]["last"] == pytest.approx(one["loss"]["last"], rel=1e-2)
    assert_kept(pruned, tmp_path / "two")
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


# --------------------------------------------------------------------------------------------
# A teacher that is not the student's


def test_teacher_with_another_vocabulary_is_refused(pruned, calib_text, capsys, tmp_path):
    other = build_tiny("llama", tmp_path / "other")  # vocabulary 128
    conftest_expect_error(capsys, tmp_path, ["finetune", pruned, "--loss", "distill", "--dense", other,
                                             *finetune_args(calib_text)[:-1]],
                          f"the teacher's vocabulary has 128 tokens and the student's {VOCAB}")


def test_teacher_with_another_tokenizer_is_refused(pruned, tiny_with_tokenizer, calib_text, capsys, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_with_tokenizer, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    conftest_expect_error(capsys, tmp_path, ["finetune", pruned, "--loss", "distill", "--dense", other,
                                             *finetune_args(calib_text)[:-1]], "the teacher's tokenizer")


@pytest.mark.parametrize("args,message", [
    (["--loss", "distill", "--teacher-mode", "disk"], "--teacher-mode must be one of auto, live, topk"),
    (["--loss", "distill", "--teacher-topk", "0"], "--teacher-topk must be an integer >= 1"),
    (["--loss", "distill", "--hidden-weight", "-1"], "--hidden-weight must be >= 0"),
    (["--hidden-weight", "1"], "--hidden-weight matches the teacher's hidden states: it needs --loss distill"),
    (["--loss", "distill", "--hidden-weight", "1", "--teacher-mode", "topk"], "needs the teacher beside the student"),
])
def test_option_errors(pruned, capsys, tmp_path, args, message):
    conftest_expect_error(capsys, tmp_path, ["finetune", pruned, *args], message)
