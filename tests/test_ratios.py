import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune import ratios
from llmprune.errors import LlmpruneError
from llmprune.ratios import Matrix


def matrices(layers=4):
    return [Matrix(f"model.layers.{i}.{kind}.weight", numel, i)
            for i in range(layers) for kind, numel in (("self_attn.q_proj", 100), ("mlp.down_proj", 300))]


def test_rules_first_match_wins_and_rest_uniform(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text('"*.layers.0.*": 0.1\n"*down_proj*": 0.7\n"re:.*layers\\\\.0\\\\..*": 0.9\n')
    with pytest.raises(LlmpruneError, match="matches no prunable matrix"):
        ratios.assign(matrices(), 0.5, ratios.load_rules(path))  # third rule is shadowed by the first
    path.write_text('"*.layers.0.*": 0.1\n"*down_proj*": 0.7\n')
    got = ratios.assign(matrices(), 0.5, ratios.load_rules(path))
    assert got["model.layers.0.mlp.down_proj.weight"] == 0.1
    assert got["model.layers.2.mlp.down_proj.weight"] == 0.7
    assert got["model.layers.2.self_attn.q_proj.weight"] == 0.5


def test_rules_list_form_and_regex(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"match": "re:model\\.layers\\.[12]\\..*", "sparsity": 0.3}]))
    got = ratios.assign(matrices(), 0.5, ratios.load_rules(path))
    assert [got[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(4)] == [0.5, 0.3, 0.3, 0.5]


@pytest.mark.parametrize("text,message", [
    ("{{{", "does not parse"), ("- 1\n- 2\n", "must map"), ('"x": 1.5\n', "in \\[0, 1\\)"),
    ('"re:(": 0.5\n', "bad regular expression"), ("", "has no rules"),
])
def test_bad_rule_files(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(LlmpruneError, match=message):
        ratios.load_rules(path)


def test_missing_rule_file(tmp_path):
    with pytest.raises(LlmpruneError, match="cannot read ratio file"):
        ratios.load_rules(tmp_path / "nope.yaml")


def test_linear_schedule_rises_and_keeps_weighted_mean():
    ms = matrices(6)
    got = ratios.assign(ms, 0.5, schedule=0.2)
    per_layer = [got[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(6)]
    assert per_layer == sorted(per_layer)
    assert per_layer[-1] - per_layer[0] == pytest.approx(0.2)
    mean = sum(got[m.name] * m.numel for m in ms) / sum(m.numel for m in ms)
    assert mean == pytest.approx(0.5, abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(base=st.floats(0.0, 0.95), spread=st.floats(0.0, 0.95), layers=st.integers(1, 12))
def test_schedule_mean_property(base, spread, layers):
    ms = matrices(layers)
    got = ratios.assign(ms, base, schedule=spread)
    mean = sum(got[m.name] * m.numel for m in ms) / sum(m.numel for m in ms)
    assert abs(mean - base) < 1e-3  # 0.1 percentage point
    assert all(0 <= v <= 0.99 for v in got.values())


@pytest.mark.parametrize("text", ["linear", "linear:x", "cosine:0.2", "linear:1.5"])
def test_bad_schedules(text):
    with pytest.raises(LlmpruneError, match="malformed schedule"):
        ratios.parse_schedule(text)


def test_the_readme_ratio_file_parses(tmp_path):
    """The README's own example, extracted from it so that the two cannot drift apart."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### Ratio files", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "rules.yaml"
    path.write_text(block)
    rules = ratios.load_rules(path)
    assert [r.sparsity for r in rules] == [0.0, 0.3, 0.6]
    assert rules[1].matches("model.layers.1.mlp.up_proj.weight")
    assert not rules[1].matches("model.layers.11.mlp.up_proj.weight")


def test_a_parse_error_names_its_line_and_column(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text('"*.o_proj.weight": 0.0\n"re:.*layers\\.(0|1)\\..*": 0.3\n')
    with pytest.raises(LlmpruneError, match=r"does not parse: line 2, column \d+: found unknown escape"):
        ratios.load_rules(path)
