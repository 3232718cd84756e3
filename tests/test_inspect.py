"""llmprune inspect: what a checkpoint holds, on outputs of each pattern; JSON-lines mode."""

import json

import pytest
import torch

from conftest import png_size, run_cli
from llmprune.checkpoint import Checkpoint
from llmprune.inspection import inspect, render


@pytest.fixture(scope="module")
def pruned(tiny_models, tmp_path_factory):
    """Tiny Llama pruned unstructured 50%, 2:4 and 4:8; tiny GPT-2 (transposed Conv1D) at 2:4."""
    root = tmp_path_factory.mktemp("inspect")
    runs = {"unstructured": ("llama", "--sparsity", "0.5"), "2:4": ("llama", "--pattern", "2:4"),
            "4:8": ("llama", "--pattern", "4:8"), "gpt2-2:4": ("gpt2", "--pattern", "2:4")}
    out = {}
    for label, (family, *args) in runs.items():
        out[label] = root / label.replace(":", "of")
        assert run_cli(tiny_models[family], *args, "-o", out[label], "-q") == 0
    return out


def test_prune_saves_sparsity_chart_linked_from_card(pruned):
    folder = pruned["unstructured"]
    assert png_size(folder / "sparsity.png") == (960, 540)
    assert recipe(folder)["plots"] == {"sparsity": "sparsity.png"}
    assert "![Sparsity per decoder layer](sparsity.png)" in (folder / "README.md").read_text()


def recipe(folder):
    return json.loads((folder / "llmprune.json").read_text())


@pytest.mark.parametrize("label,valid", [
    ("unstructured", {"2:4": False, "4:8": False}),
    ("2:4", {"2:4": True, "4:8": True}),  # two zeros in every 4 means four in every 8
    ("4:8", {"2:4": False, "4:8": True}),
    ("gpt2-2:4", {"2:4": True, "4:8": True}),
])
def test_sparsity_and_n_m_of_pruned_outputs(pruned, label, valid):
    report = inspect(str(pruned[label]), progress=False)
    written = recipe(pruned[label])["sparsity"]["matrices"]
    assert {m.name for m in report.matrices} == set(written)
    for m in report.matrices:
        assert m.zeros == round(written[m.name]["achieved"] * written[m.name]["numel"]), m.name
        assert m.sparsity == pytest.approx(0.5, abs=1e-9)
        assert m.n_m == valid, m.name
    totals = report.totals()
    assert totals["prunable_sparsity"] == pytest.approx(recipe(pruned[label])["sparsity"]["overall"], abs=1e-12)
    assert totals["n_m"] == valid
    assert [layer["sparsity"] for layer in report.layers] == pytest.approx([0.5, 0.5, 0.5])


def test_gpt2_conv1d_checked_along_the_input_dimension(pruned):
    """GPT-2 stores (in, out); N:M groups run along `in`, i.e. down the stored columns."""
    report = inspect(str(pruned["gpt2-2:4"]), progress=False)
    ckpt = Checkpoint(pruned["gpt2-2:4"])
    m = next(m for m in report.matrices if m.linear == "mlp.c_fc")
    stored = ckpt.read(m.name)  # (in=64, out=256)
    assert list(stored.shape) == m.shape == [64, 256]
    along_in = (stored.t().reshape(256, 16, 4) == 0).sum(dim=2)
    along_stored_rows = (stored.reshape(64, 64, 4) == 0).sum(dim=2)
    assert bool((along_in >= 2).all()) and not bool((along_stored_rows >= 2).all())
    ckpt.close()


def test_dense_input_totals_and_no_recipe(tiny_models):
    report = inspect(str(tiny_models["llama"]), progress=False)
    ckpt = Checkpoint(tiny_models["llama"])
    total = sum(torch.Size(ckpt.spec(n).shape).numel() for n in ckpt.names)
    t = report.totals()
    assert t["prunable_zeros"] == 0 and t["n_m"] == {"2:4": False, "4:8": False}
    assert t["params"] == total and report.dtypes == {"float32": total}
    assert t["prunable_params"] == 3 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)  # q, o; k, v (GQA); gate, up, down
    assert report.weights_bytes == ckpt.nbytes and report.recipe is None
    assert len(report.matrices) == 21 and report.num_layers == 3
    ckpt.close()


def test_reads_only_the_prunable_matrices_one_at_a_time(pruned, monkeypatch):
    reads = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: reads.append(name) or original(self, name))
    report = inspect(str(pruned["2:4"]), progress=False)
    assert reads == [m.name for m in report.matrices]  # each once; embeddings, norms, head never read


def test_cli_table_json_and_recipe(pruned, capsys):
    assert run_cli("inspect", pruned["2:4"], "-q") == 0
    text = capsys.readouterr().out
    assert "self_attn.q_proj" in text and "50.00%" in text and "recipe" in text and "pattern 2:4" in text
    row = next(line for line in text.splitlines() if "mlp.down_proj" in line)
    assert row.split()[-2:] == ["yes", "yes"] and "64x128" in row
    assert run_cli("inspect", pruned["unstructured"], "--json", "--n-m", "2:4", "-q") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_m_checked"] == ["2:4"] and data["totals"]["n_m"] == {"2:4": False}
    assert data["recipe"]["method"] == "magnitude" and data["recipe"]["achieved"] == pytest.approx(0.5)
    assert all(m["sparsity"] == pytest.approx(0.5) for m in data["matrices"])


def test_render_matches_report(pruned):
    report = inspect(str(pruned["4:8"]), progress=False)
    lines = render(report).splitlines()
    assert lines[0].split() == ["layer", "matrix", "shape", "dtype", "sparsity", "2:4", "4:8"]
    assert sum(1 for line in lines if line.split()[:1] == ["0"]) == 7  # seven matrices in layer 0


def test_json_log_format(pruned, capsys):
    assert run_cli("inspect", pruned["2:4"], "--log-format", "json") == 0
    err = capsys.readouterr().err.strip().splitlines()
    events = [json.loads(line) for line in err]  # every stderr line is one JSON object
    mine = [e for e in events if e.get("step") == "inspect"]
    assert [e["event"] for e in mine][0] == "start" and mine[-1]["event"] == "done"
    last = [e for e in mine if e["event"] == "progress"][-1]
    assert last["done"] == last["total"] == 3 and last["eta_s"] == 0


def test_errors_are_one_line(tmp_path, capsys):
    assert run_cli("inspect", tmp_path / "nope") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmprune: error: ") and "does not exist" in err and len(err.splitlines()) == 1
    assert run_cli("inspect", tmp_path / "nope", "--log-format", "json") == 2
    line = json.loads(capsys.readouterr().err.strip())
    assert line["event"] == "error" and "does not exist" in line["message"]


def test_bad_n_m(tiny_models, capsys):
    assert run_cli("inspect", tiny_models["llama"], "--n-m", "unstructured") == 2
    assert "--n-m takes N:M patterns" in capsys.readouterr().err


def test_prune_json_lines_end_with_summary(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(tiny_models["llama"], "--sparsity", "0.5", "-o", out, "--log-format", "json", "-q") == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # quiet JSON mode: no table, no progress events, only the summary
    events = [json.loads(line) for line in captured.err.strip().splitlines()]
    assert [e["event"] for e in events] == ["summary"]
    assert events[0]["sparsity"] == pytest.approx(0.5) and events[0]["output"] == str(out)
    assert events[0]["peak_rss_mb"] > 0 and events[0]["perplexity_pruned"] is None


def _steps(capsys) -> dict[str, list[str]]:
    """The progress events on stderr, grouped by step."""
    events = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    steps: dict[str, list[str]] = {}
    for e in events:
        if e.get("step") is not None:
            steps.setdefault(e["step"], []).append(e["event"])
    return steps


def test_whole_model_load_and_save_have_progress(tiny_with_tokenizer, calib_text, tmp_path, capsys):
    """Whole-model evaluation and fine-tuning report their load and save as steps with ETA."""
    assert run_cli("eval", tiny_with_tokenizer, "--no-stream", "--data", calib_text, "--seqlen", "32",
                   "--max-windows", "4", "--log-format", "json") == 0
    steps = _steps(capsys)
    assert steps["load"][0] == "start" and steps["load"][-1] == "done" and "progress" in steps["load"]
    assert steps["eval"][-1] == "done"
    out = tmp_path / "ft"
    assert run_cli("finetune", tiny_with_tokenizer, "-o", out, "--steps", "2", "--seqlen", "32", "--batch-size", "2",
                   "--mode", "whole", "--data", calib_text, "--log-format", "json") == 0
    steps = _steps(capsys)
    for step in ("load", "fine-tune", "save"):
        assert steps[step][0] == "start" and steps[step][-1] == "done", step
