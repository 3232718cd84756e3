"""Perplexity evaluation (llmprune.perplexity): the protocol, whole vs streamed, the CLI, bad input."""

from __future__ import annotations

import importlib
import json
import math
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, build_tiny
from llmprune import evaluate as api_evaluate
from llmprune import packaged
from llmprune.checkpoint import Checkpoint
from llmprune.cli import main
from llmprune.config import EvalConfig
from llmprune.errors import LlmpruneError
from llmprune.perplexity import EvalResult, evaluate, load_windows, nll_sum
from llmprune.sizing import choose_stream

SMOL_VOCAB = 49152
# the module itself, for monkeypatching:
EVAL_MODULE = importlib.import_module("llmprune.perplexity")


def reference_ppl(folder: Path, windows: torch.Tensor) -> float:
    """The plain transformers computation: mean of per-window losses, exponentiated."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def random_windows(n: int, seqlen: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory) -> Path:
    """A tiny llama that speaks SmolLM2's tokenizer (vocab 49152), context 256."""
    folder = tmp_path_factory.mktemp("tok") / "tiny-llama-tok"
    build_tiny("llama", folder, vocab_size=SMOL_VOCAB, hidden_size=32, intermediate_size=64,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    smol = packaged.smollm2_checkpoint()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / name, folder / name)
    return folder


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"Sentence {i} says the river runs past village {i % 7}." for i in range(60)))
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------- the measure


def test_nll_sum_by_hand():
    # Window [0, 1, 2] over a vocabulary of 3: position 0 predicts token 1 with p = 0.5, position 1
    # predicts token 2 with p = 0.6, position 2 predicts nothing (its row must not count).
    ids = torch.tensor([[0, 1, 2]])
    probs = torch.tensor([[[0.25, 0.5, 0.25], [0.2, 0.2, 0.6], [1e-6, 1e-6, 1.0]]])
    assert nll_sum(probs.log(), ids).item() == pytest.approx(math.log(2) + math.log(1 / 0.6), rel=1e-6)


def test_uniform_logits_give_vocabulary_size():
    # Uniform logits over 4 tokens: every one of the 2 * 4 predicted tokens costs log 4, so ppl = 4.
    ids = torch.zeros(2, 5, dtype=torch.long)
    total = nll_sum(torch.zeros(2, 5, 4), ids)
    assert total.item() == pytest.approx(8 * math.log(4))
    assert math.exp(total.item() / 8) == pytest.approx(4.0)


def test_chunked_nll_equals_one_shot(monkeypatch):
    logits = torch.randn(3, 40, 50, generator=torch.Generator().manual_seed(0))
    ids = random_windows(3, 40, vocab=50)
    whole = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="sum")
    monkeypatch.setattr(EVAL_MODULE, "LOGITS_CHUNK_BYTES", 3 * 50 * 4 * 7)  # 7 positions per chunk
    assert nll_sum(logits, ids).item() == pytest.approx(whole.item(), rel=1e-6)
    assert nll_sum(logits.bfloat16(), ids).item() == pytest.approx(whole.item(), rel=1e-2)


def test_device_defaults_by_hand(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # constructing a cuda device needs no GPU
    assert EVAL_MODULE.auto_batch_size(cpu, 2048, SMOL_VOCAB) == 1
    assert EVAL_MODULE.auto_batch_size(cuda, 2048, SMOL_VOCAB) == 10  # 2 GiB // (2048 * 49152 * 2 bytes)
    assert EVAL_MODULE.auto_batch_size(cuda, 4096, 256_000) == 1
    half = Checkpoint(build_tiny("llama", tmp_path / "fp16", dtype=torch.float16))
    assert EVAL_MODULE.default_dtype(cpu, half) == torch.float32
    assert EVAL_MODULE.default_dtype(cuda, half) == torch.float16
    # Embedding and head 2 * 128 * 64, final norm 64, and 3 layers of q, o 64 * 64, k, v 32 * 64 (2 kv heads
    # of 16), gate, up, down 3 * 64 * 128 and two norms of 64: 127424 parameters.
    assert EVAL_MODULE.weight_bytes(half, torch.float16) == 127424 * 2
    assert EVAL_MODULE.weight_bytes(half, torch.float32) == 127424 * 4


def test_choose_stream_rule():
    assert not choose_stream(7, 10)  # 70% of what is available: whole model
    assert choose_stream(8, 10)
    assert not choose_stream(10**15, None)  # unknown memory: whole model


# ------------------------------------------------------------------ exactness, every family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_whole_and_streamed_match_transformers(tiny_models, family):
    folder = tiny_models[family]
    windows = random_windows(5, 48)  # longer than the mistral/gemma3 sliding windows
    ref = reference_ppl(folder, windows)
    whole = evaluate(folder, windows=windows, stream=False, batch_size=2, progress=False)
    streamed = evaluate(folder, windows=windows, stream=True, batch_size=2, progress=False)
    assert whole.mode == "whole" and streamed.mode == "streamed"
    assert whole.perplexity == pytest.approx(ref, rel=1e-4)
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-4)
    assert (whole.windows, whole.seqlen, whole.tokens) == (5, 48, 5 * 47)
    assert whole.nll == pytest.approx(whole.tokens * math.log(whole.perplexity))


def test_batch_size_does_not_change_result(tiny_models):
    windows = random_windows(5, 32, seed=3)
    one = evaluate(tiny_models["llama"], windows=windows, stream=True, batch_size=1, progress=False)
    five = evaluate(tiny_models["llama"], windows=windows, stream=True, batch_size=5, progress=False)
    assert five.perplexity == pytest.approx(one.perplexity, rel=1e-5)


def test_auto_mode_follows_available_memory(tiny_models, monkeypatch):
    windows = random_windows(2, 16)
    monkeypatch.setattr(EVAL_MODULE, "available_memory", lambda device: 10**12)
    assert evaluate(tiny_models["qwen2"], windows=windows, progress=False).mode == "whole"
    monkeypatch.setattr(EVAL_MODULE, "available_memory", lambda device: 1000)
    assert evaluate(tiny_models["qwen2"], windows=windows, progress=False).mode == "streamed"


def test_loaded_model_accepted(tiny_models):
    windows = random_windows(3, 24)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"], dtype=torch.float32).train()
    loaded = evaluate(model, windows=windows, progress=False)
    assert loaded.perplexity == pytest.approx(evaluate(tiny_models["gpt2"], windows=windows, progress=False).perplexity,
                                              rel=1e-5)
    assert model.training  # evaluated in eval mode (no dropout), then restored


def test_windows_checked(tiny_models):
    with pytest.raises(LlmpruneError, match="vocabulary"):
        evaluate(tiny_models["llama"], windows=torch.full((1, 8), 128), progress=False)
    with pytest.raises(LlmpruneError, match="seqlen"):
        evaluate(tiny_models["llama"], windows=torch.zeros(2, 1, dtype=torch.long), progress=False)
    with pytest.raises(LlmpruneError, match="context of 256"):
        evaluate(tiny_models["llama"], windows=torch.zeros(1, 300, dtype=torch.long), progress=False)


# ------------------------------------------------------------------- windows and the CLI


def test_load_windows_shared_by_two_models(tok_model, corpus, tmp_path):
    windows = load_windows(tok_model, str(corpus), seqlen=32, max_windows=3)
    assert windows.shape == (3, 32) and windows.dtype == torch.long
    other = build_tiny("llama", tmp_path / "other", vocab_size=SMOL_VOCAB, hidden_size=32, intermediate_size=64,
                       tie_word_embeddings=True, num_hidden_layers=2)
    a = evaluate(tok_model, windows=windows, data="corpus", progress=False)
    b = evaluate(other, windows=windows, data="corpus", progress=False)
    assert a.data == b.data == "corpus" and a.tokens == b.tokens == 3 * 31
    assert a.perplexity != b.perplexity


def test_cli_eval_writes_json(tok_model, corpus, tmp_path, capsys):
    out = tmp_path / "res" / "ppl.json"
    code, stdout, _ = run_cli(capsys, "eval", tok_model, "--data", corpus, "--seqlen", 32, "--max-windows", 4,
                              "--batch-size", 3, "--json", out, "-q")
    assert code == 0
    report = json.loads(out.read_text())
    assert float(stdout.strip()) == pytest.approx(report["perplexity"], abs=1e-4)
    assert report["windows"] == 4 and report["tokens"] == 4 * 31 and report["mode"] == "whole"
    assert report["data"] == str(corpus) and report["config"]["seqlen"] == 32
    assert report["command"].startswith("llmprune eval ")
    windows = load_windows(tok_model, str(corpus), seqlen=32, max_windows=4)
    assert report["perplexity"] == pytest.approx(reference_ppl(tok_model, windows), rel=1e-4)


def test_cli_default_data_is_offline(tok_model, capsys):
    code, stdout, _ = run_cli(capsys, "eval", tok_model, "--seqlen", 64, "--max-windows", 2, "--stream")
    assert code == 0
    assert "streamed" in stdout and "2 windows x 64 tokens" in stdout
    assert "sotu" in stdout or "wikitext2" in stdout


def test_python_api_takes_config(tok_model, corpus):
    result = api_evaluate(EvalConfig(str(tok_model), data=str(corpus), seqlen=32, max_windows=2))
    assert isinstance(result, EvalResult) and result.windows == 2


def test_config_validation():
    assert EvalConfig("m", tasks="hellaswag, arc_easy").tasks == ("hellaswag", "arc_easy")
    for bad in (dict(seqlen=1), dict(max_windows=0), dict(batch_size=0), dict(dtype="int8"), dict(device="tpu")):
        with pytest.raises(LlmpruneError):
            EvalConfig("m", **bad)


# ------------------------------------------------------------------------------ bad input


def one_line_error(capsys, *args) -> str:
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), err
    return lines[0]


def test_unknown_dataset(tok_model, capsys):
    assert "unknown dataset 'wikitext3'" in one_line_error(capsys, "eval", tok_model, "--data", "wikitext3")


def test_corpus_shorter_than_a_window(tok_model, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert "too short" in one_line_error(capsys, "eval", tok_model, "--data", short, "--seqlen", 64)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "no text" in one_line_error(capsys, "eval", tok_model, "--data", empty, "--seqlen", 64)


def test_seqlen_above_context(tok_model, corpus, capsys):
    msg = one_line_error(capsys, "eval", tok_model, "--data", corpus, "--seqlen", 512)
    assert "exceeds the model's context of 256" in msg


def test_model_that_does_not_load(tmp_path, corpus, capsys):
    assert "does not exist" in one_line_error(capsys, "eval", tmp_path / "nowhere", "--data", corpus)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    one_line_error(capsys, "eval", broken, "--data", corpus)
    no_weights = tmp_path / "no-weights"
    build_tiny("llama", no_weights)
    for shard in no_weights.glob("*.safetensors*"):
        shard.unlink()
    assert "safetensors" in one_line_error(capsys, "eval", no_weights, "--data", corpus)


def test_model_without_tokenizer(tiny_models, corpus, capsys):
    assert "tokenizer" in one_line_error(capsys, "eval", tiny_models["llama"], "--data", corpus, "--seqlen", 16)


def test_bad_flags(tok_model, capsys):
    one_line_error(capsys, "eval", tok_model, "--seqlen", "many")
    one_line_error(capsys, "eval", tok_model, "--max-windows", 0)
    one_line_error(capsys, "eval", tok_model, "--dtype", "int4")


# ------------------------------------------------------------------------ zero-shot tasks


def test_tasks_need_lm_eval(tok_model, corpus, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    msg = one_line_error(capsys, "eval", tok_model, "--data", corpus, "--seqlen", 32, "--tasks", "hellaswag")
    assert msg == "llmprune: error: --tasks needs the lm-eval package: pip install lm-eval"


def test_tasks_through_lm_eval(tok_model, corpus, capsys, monkeypatch, tmp_path):
    calls = {}

    def simple_evaluate(**kwargs):
        calls.update(kwargs)
        return {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": 0.01}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    out = tmp_path / "t.json"
    code, stdout, _ = run_cli(capsys, "eval", tok_model, "--data", corpus, "--seqlen", 32, "--max-windows", 1,
                              "--tasks", "arc_easy", "--json", out)
    assert code == 0 and "acc,none 0.2500" in stdout
    assert json.loads(out.read_text())["tasks"] == {"arc_easy": {"acc,none": 0.25, "acc_stderr,none": 0.01}}
    assert calls["tasks"] == ["arc_easy"] and f"pretrained={tok_model}" in calls["model_args"]


def test_tasks_offline_is_one_line(tok_model, corpus, capsys, monkeypatch):
    def simple_evaluate(**kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    msg = one_line_error(capsys, "eval", tok_model, "--data", corpus, "--seqlen", 32, "--max-windows", 1,
                         "--tasks", "hellaswag", "-q")  # -q: no progress bar from the perplexity run before it
    assert "hellaswag failed: ConnectionError: Couldn't reach" in msg


# --------------------------------------------------------------------------- packaged SmolLM2


@pytest.fixture(scope="module")
def smol() -> Path:
    return packaged.smollm2_checkpoint()


def test_smollm2_dense_matches_transformers(smol):
    windows = load_windows("packaged:smollm2", "sotu", seqlen=128, max_windows=2)
    ref = reference_ppl(smol, windows)
    whole = evaluate("packaged:smollm2", windows=windows, stream=False, progress=False)
    streamed = evaluate("packaged:smollm2", windows=windows, stream=True, progress=False)
    assert whole.perplexity == pytest.approx(ref, rel=1e-4)
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-4)
    assert 1 < whole.perplexity < 100  # a trained model on English prose, not a random one


@pytest.mark.slow
def test_smollm2_full_length_windows(smol):
    windows = load_windows("packaged:smollm2", "sotu", seqlen=2048, max_windows=3)
    ref = reference_ppl(smol, windows)
    whole = evaluate(smol, windows=windows, stream=False, progress=False)
    streamed = evaluate(smol, windows=windows, stream=True, batch_size=2, progress=False)
    assert whole.perplexity == pytest.approx(ref, rel=1e-4)
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-4)
