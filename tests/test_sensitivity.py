"""llmprune sensitivity: damage checked by hand, and a ratio file that round-trips through --ratios."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import png_size, run_cli
from llmprune import ratios
from llmprune.config import SensitivityConfig
from llmprune.perplexity import evaluate, load_windows
from llmprune.calibrate import calibration_ids
from llmprune.source import open_source, prunable_matrices

CALIB = ("--nsamples", "2", "--seqlen", "32")


@pytest.fixture(scope="module")
def scan(tiny_with_tokenizer, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("sens") / "out"
    assert run_cli("sensitivity", tiny_with_tokenizer, "--sparsities", "0.3,0.6", "--sparsity", "0.5",
                   "--spread", "0.2", "--calib-data", calib_text, *CALIB, "-o", out, "-q") == 0
    return out, json.loads((out / "sensitivity.json").read_text())


def magnitude_by_hand(weight: torch.Tensor, sparsity: float) -> None:
    """Zero the round(s * numel) smallest |w| in place (random weights: no ties)."""
    k = round(sparsity * weight.numel())
    threshold = weight.abs().flatten().kthvalue(k).values
    weight[weight.abs() <= threshold] = 0


@torch.no_grad()
def test_recon_damage_of_layer_0_by_hand(scan, tiny_with_tokenizer, calib_text):
    _, report = scan
    cfg = SensitivityConfig(model=str(tiny_with_tokenizer), nsamples=2, seqlen=32, calib_data=str(calib_text))
    ids = calibration_ids(cfg.probe(0.5), open_source(str(tiny_with_tokenizer)))
    model = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                             with_kwargs=True)
    model(input_ids=ids, use_cache=False)
    handle.remove()

    def out():
        y = layer(*seen["args"], **seen["kwargs"])
        return y[0] if isinstance(y, tuple) else y

    dense = out()
    for sparsity in (0.3, 0.6):
        originals = {n: p.clone() for n, p in layer.named_parameters() if p.dim() == 2}
        for name in originals:
            magnitude_by_hand(layer.get_parameter(name), sparsity)
        expected = float((out() - dense).square().sum() / dense.square().sum())
        assert report["layers"][0]["damage"][f"{sparsity:g}"] == pytest.approx(expected, rel=1e-3)
        for name, value in originals.items():
            layer.get_parameter(name).copy_(value)


def test_damage_grows_with_sparsity(scan):
    _, report = scan
    for row in report["layers"]:
        assert 0 < row["damage"]["0.3"] < row["damage"]["0.6"]


def test_ratio_file_round_trips_through_ratios(scan, tiny_with_tokenizer, tmp_path):
    out, report = scan
    allocation = [row["sparsity"] for row in report["layers"]]
    matrices = prunable_matrices(open_source(str(tiny_with_tokenizer)))
    targets = ratios.assign(matrices, 0.5, ratios.load_rules(out / "ratios.yaml"))
    for m in matrices:
        assert targets[m.name] == pytest.approx(allocation[m.layer], abs=1e-6)
    total = sum(m.numel for m in matrices)
    assert sum(targets[m.name] * m.numel for m in matrices) / total == pytest.approx(0.5, abs=1e-5)
    assert max(allocation) - min(allocation) == pytest.approx(0.2, abs=1e-6)  # the spread, nothing clipped
    score = [sum(math.log(d) for d in row["damage"].values()) for row in report["layers"]]
    assert allocation.index(max(allocation)) == score.index(min(score))  # the most robust layer is pruned most
    assert allocation.index(min(allocation)) == score.index(max(score))

    pruned = tmp_path / "pruned"
    assert run_cli(tiny_with_tokenizer, "--sparsity", "0.5", "--ratios", out / "ratios.yaml", "-o", pruned, "-q") == 0
    achieved = json.loads((pruned / "llmprune.json").read_text())["sparsity"]["layers"]
    assert achieved == pytest.approx(allocation, abs=1e-4)


def test_outputs_written(scan):
    out, report = scan
    assert sorted(p.name for p in out.iterdir()) == ["ratios.yaml", "sensitivity.json", "sensitivity.md",
                                                     "sensitivity.png"]
    assert png_size(out / "sensitivity.png") == (960, 540)
    md = (out / "sensitivity.md").read_text()
    first = report["layers"][0]
    assert f"| 0 | {first['damage']['0.3']:.4g} | {first['damage']['0.6']:.4g} | {first['sparsity']:.2%} |" in md
    assert (out / "ratios.yaml").read_text().count('"model.layers.') == 3


def test_ppl_metric_matches_a_pruned_model(tiny_with_tokenizer, calib_text, tmp_path):
    """--metric ppl with layer 1 pruned alone equals the perplexity of a prune that touches only layer 1."""
    out = tmp_path / "ppl"
    evaluation = ("--eval", calib_text, "--eval-seqlen", "32", "--eval-max-windows", "1")
    assert run_cli("sensitivity", tiny_with_tokenizer, "--metric", "ppl", "--sparsities", "0.5", *evaluation,
                   "-o", out, "-q") == 0
    report = json.loads((out / "sensitivity.json").read_text())
    windows = load_windows(tiny_with_tokenizer, str(calib_text), 32, 1)
    assert report["dense_perplexity"] == pytest.approx(
        evaluate(str(tiny_with_tokenizer), windows=windows, progress=False).perplexity, rel=1e-6)
    rules = tmp_path / "layer1.yaml"
    rules.write_text('"model.layers.1.*": 0.5\n')
    assert run_cli(tiny_with_tokenizer, "--sparsity", "0", "--ratios", rules, "-o", tmp_path / "one", "-q") == 0
    one = evaluate(str(tmp_path / "one"), windows=windows, progress=False).perplexity
    assert report["layers"][1]["damage"]["0.5"] == pytest.approx(one, rel=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--metric", "loss"], "--metric must be one of recon, ppl"),
    (["--sparsities", "0,0.5"], "must be above 0"),
    (["--spread", "1.5"], "--spread must be a number in [0, 1)"),
    (["--sparsity", "1"], "--sparsity must be a number in [0, 1)"),
    (["--method", "nope"], "unknown method"),
])
def test_bad_options(tiny_models, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert run_cli("sensitivity", tiny_models["llama"], *args, "-o", out, "-q") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
