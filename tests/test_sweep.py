"""llmprune sweep: a grid on a tiny model writes a table, JSON and a valid PNG; numbers check out."""

import json

import pytest

from conftest import png_size, run_cli
from llmprune import data
from llmprune.perplexity import evaluate, load_windows

CALIB = ("--nsamples", "2", "--seqlen", "32")


@pytest.fixture(scope="module")
def swept(tiny_with_tokenizer, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    calls = []
    real = data.calibration_samples
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "calibration_samples", lambda *a, **k: calls.append(a) or real(*a, **k))
        code = run_cli("sweep", tiny_with_tokenizer, "--methods", "magnitude,wanda", "--sparsities", "0.3,0.5",
                       "--eval", calib_text, "--eval-seqlen", "32", "--eval-max-windows", "2", *CALIB,
                       "--calib-data", calib_text, "--keep-models", "-o", out, "-q")
    assert code == 0
    return out, json.loads((out / "sweep.json").read_text()), calls


def test_grid_points_and_achieved_sparsity(swept):
    _, report, _ = swept
    assert [(p["method"], p["sparsity"]) for p in report["points"]] == [
        ("magnitude", 0.3), ("magnitude", 0.5), ("wanda", 0.3), ("wanda", 0.5)]
    for p in report["points"]:  # magnitude: round(s x numel) per matrix; wanda: round(s x 64) per 64-wide row
        expected = p["sparsity"] if p["method"] == "magnitude" else round(p["sparsity"] * 64) / 64
        assert p["achieved"] == pytest.approx(expected, abs=1e-4)
    assert report["eval"] == {"data": report["config"]["eval"], "windows": 2, "seqlen": 32}
    assert report["calibration"]["nsamples"] == 2 and report["calibration"]["seqlen"] == 32


def test_calibration_windows_sampled_once(swept):
    _, _, calls = swept
    assert len(calls) == 1  # two wanda points share one tokenisation


def test_perplexities_match_independent_evaluation(swept, tiny_with_tokenizer, calib_text):
    out, report, _ = swept
    windows = load_windows(tiny_with_tokenizer, str(calib_text), 32, 2)
    dense = evaluate(str(tiny_with_tokenizer), windows=windows, progress=False).perplexity
    assert report["dense"]["perplexity"] == pytest.approx(dense, rel=1e-6)
    assert sorted(p.name for p in (out / "models").iterdir()) == [
        "magnitude-0.3", "magnitude-0.5", "wanda-0.3", "wanda-0.5"]
    for p in (report["points"][0], report["points"][3]):  # magnitude 0.3, wanda 0.5
        kept = out / "models" / f"{p['method']}-{p['sparsity']:g}"
        assert json.loads((kept / "llmprune.json").read_text())["config"]["method"] == p["method"]
        assert evaluate(str(kept), windows=windows, progress=False).perplexity == pytest.approx(p["perplexity"], rel=1e-6)


def test_markdown_table_and_png(swept):
    out, report, _ = swept
    md = (out / "sweep.md").read_text()
    assert "| sparsity | magnitude | wanda |" in md
    by = {(p["method"], p["sparsity"]): p["perplexity"] for p in report["points"]}
    assert f"| 30% | {by['magnitude', 0.3]:.3f} | {by['wanda', 0.3]:.3f} |" in md
    assert f"| 0% (dense) | {report['dense']['perplexity']:.3f} |" in md
    assert png_size(out / "sweep.png") == (960, 540)


def test_only_the_report_is_left_by_default(tiny_with_tokenizer, calib_text, tmp_path):
    out = tmp_path / "s"
    assert run_cli("sweep", tiny_with_tokenizer, "--methods", "magnitude", "--sparsities", "0.5", "--eval", calib_text,
                   "--eval-seqlen", "32", "--eval-max-windows", "1", "-o", out, "-q") == 0
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.md", "sweep.png"]
    assert json.loads((out / "sweep.json").read_text())["calibration"] is None  # magnitude needs none
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folder left


def test_model_without_tokenizer_fails_cleanly(tiny_models, calib_text, tmp_path, capsys):
    out = tmp_path / "s"
    assert run_cli("sweep", tiny_models["llama"], "--methods", "magnitude", "--sparsities", "0.5",
                   "--eval", calib_text, "--eval-seqlen", "32", "-o", out, "-q") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer" in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,message", [
    (["--sparsities", "0.5,1.5"], "--sparsity must be a number in [0, 1)"),
    (["--sparsities", "0.5,x"], "--sparsities must be comma-separated numbers"),
    (["--pattern", "2:4", "--sparsities", "0.3"], "contradicts --sparsity 0.3"),
    (["--methods", "magnitude,nope"], "unknown method 'nope'"),
    (["--methods", "wanda,wanda"], "must not repeat"),
])
def test_bad_grid(tiny_models, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert run_cli("sweep", tiny_models["llama"], *args, "-o", out, "-q") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
