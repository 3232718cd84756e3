"""Bad input, nothing lost: damaged checkpoints, full disks, short texts, impossible ratios.

Each case gets one line on stderr, exit code 2, no output folder, no temporary folder left
behind, and an input checkpoint that is byte for byte what it was.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli, tree_hash
from llmprune import masks, ratios
from llmprune.errors import LlmpruneError
from llmprune.ratios import Matrix
from conftest import expect_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def src(tiny_models, tmp_path):
    """A private copy of the tiny Llama (4 shards) that a test may damage."""
    folder = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], folder)
    return folder


def test_corrupt_shard_header(src, capsys, tmp_path):
    shard = sorted(src.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    shard.write_bytes(raw[:8] + b"{garbage" + raw[16:])
    expect_error(capsys, tmp_path, [src, "--sparsity", "0.5"], "corrupt safetensors file")


def test_index_names_a_missing_shard(src, capsys, tmp_path):
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.unlink()
    expect_error(capsys, tmp_path, [src, "--sparsity", "0.5"], f"names {shard.name}, which is missing")


def test_sharded_pickle_checkpoint(src, capsys, tmp_path):
    for f in src.glob("*.safetensors*"):
        f.unlink()
    (src / "pytorch_model-00001-of-00002.bin").write_bytes(b"pickle")
    (src / "pytorch_model.bin.index.json").write_text("{}")
    expect_error(capsys, tmp_path, [src, "--sparsity", "0.5"], "convert them to safetensors")


def test_read_only_input_is_never_modified(src, tmp_path):
    before = tree_hash(src)
    listing = sorted(p.name for p in src.iterdir())
    for path in [*src.iterdir(), src]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        assert run_cli(src, "--sparsity", "0.5", "-o", tmp_path / "out", "-q") == 0
    finally:
        for path in [src, *src.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert tree_hash(src) == before and sorted(p.name for p in src.iterdir()) == listing


def test_disk_full_mid_write(src, capsys, tmp_path, monkeypatch):
    """The file system fills up after a few tensors: a clear error, no output, nothing left behind."""
    from llmprune import checkpoint

    calls = {"n": 0}
    real = os.pwrite

    def filling_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(checkpoint.os, "pwrite", filling_pwrite)
    expect_error(capsys, tmp_path, [src, "--sparsity", "0.5"], "No space left on device")
    assert calls["n"] > 12


def _unshare_available() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not shutil.which("unshare") or not _unshare_available(),
                    reason="needs user and mount namespaces to mount a small tmpfs")
def test_output_on_a_too_small_file_system(src, tmp_path):
    """A real 200 KB tmpfs: the run is refused before any layer is pruned, with the numbers."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = (f"mount -t tmpfs -o size=200k tmpfs {disk} && "
           f"{sys.executable} -m llmprune.cli {src} --sparsity 0.5 -o {disk}/out -q; "
           f"echo rc=$?; ls -A {disk}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", cmd],
                         capture_output=True, text=True, env=env)
    lines = res.stdout.split()
    err = res.stderr.strip()
    assert "rc=2" in lines, (res.stdout, err)
    assert lines[-1] == "rc=2", f"left behind on the small disk: {res.stdout}"
    assert len(err.splitlines()) == 1 and "not enough free disk space" in err and "needs" in err, err


def test_calibration_text_too_short(tiny_with_tokenizer, capsys, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    expect_error(capsys, tmp_path, [tiny_with_tokenizer, "--method", "wanda", "--sparsity", "0.5",
                                    "--calib-data", text, "--seqlen", "64", "--nsamples", "2"],
                 "no calibration document longer than 64 tokens")


def test_calibration_without_a_tokenizer(src, capsys, tmp_path):
    """A folder with weights but no tokenizer: one line naming the folder, exit 2 (was a multi-line error)."""
    expect_error(capsys, tmp_path, [src, "--method", "wanda", "--sparsity", "0.5", "--seqlen", "32", "--nsamples", "2"],
                 f"{src} has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json): pass --tokenizer "
                 "PATH_OR_ID")


def test_evaluation_text_too_short(tiny_with_tokenizer, capsys, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    expect_error(capsys, tmp_path, [tiny_with_tokenizer, "--sparsity", "0.5", "--eval", text, "--eval-seqlen", "64"],
                 "64")


@pytest.mark.parametrize("text,message", [
    ("", "has no rules"),
    ("{}\n", "has no rules"),
    ("[]\n", "has no rules"),
    ("- 3\n", "must map name patterns"),
    ('"*.q_proj.weight": 1.5\n', "must be a number in [0, 1)"),
    ('"re:(": 0.2\n', "bad regular expression"),
])
def test_ratio_files_that_name_nothing_or_nonsense(tiny_models, capsys, tmp_path, text, message):
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    expect_error(capsys, tmp_path, [tiny_models["llama"], "--sparsity", "0.5", "--ratios", rules], message)


def test_n_m_with_a_sparsity_it_cannot_reach(tiny_models, capsys, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text('"*.o_proj.weight": 0.3\n')
    expect_error(capsys, tmp_path, [tiny_models["llama"], "--pattern", "2:4", "--ratios", rules],
                 "cannot be reached with 2:4")


# -- property tests on ratio files -------------------------------------------------------------

MATRICES = [Matrix(f"model.layers.{i}.{kind}.weight", 64 * (j + 1), i)
            for i in range(4) for j, kind in enumerate(("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"))]
PATTERNS = st.sampled_from(["*", "*.q_proj.weight", "*.o_proj.weight", "*down_proj*", "*.layers.0.*", "*.layers.3.*",
                            "re:.*layers\\.[12]\\..*", "re:.*proj\\.weight", "*.nothing.*", "re:nothing"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules=st.lists(st.tuples(PATTERNS, st.floats(0, 0.99, allow_nan=False)), min_size=1, max_size=5,
                      unique_by=lambda r: r[0]),
       base=st.floats(0, 0.99), as_json=st.booleans())
def test_ratio_file_first_match_wins(tmp_path, rules, base, as_json):
    """Whatever the rules: each matrix takes its first matching rule, else the base; a rule that
    matches nothing (or only matrices an earlier rule took) is refused by name."""
    path = tmp_path / ("r.json" if as_json else "r.yaml")
    path.write_text(json.dumps(dict(rules)) if as_json else yaml.safe_dump(dict(rules), sort_keys=False))
    loaded = ratios.load_rules(path)
    assert [(r.pattern, r.sparsity) for r in loaded] == rules
    first = {m.name: next((s for p, s in rules if ratios.Rule(p, s).matches(m.name)), None) for m in MATRICES}
    used = set()
    for m in MATRICES:
        hit = next((p for p, _ in rules if ratios.Rule(p, 0).matches(m.name)), None)
        if hit is not None:
            used.add(hit)
    unused = [p for p, _ in rules if p not in used]
    if unused:
        with pytest.raises(LlmpruneError, match="matches no prunable matrix") as info:
            ratios.assign(MATRICES, base, loaded)
        assert repr(unused[0]) in str(info.value)
        return
    got = ratios.assign(MATRICES, base, loaded)
    assert got == {m.name: base if first[m.name] is None else first[m.name] for m in MATRICES}


@settings(max_examples=60, deadline=None)
@given(value=st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.text(max_size=4), st.booleans(), st.none()))
def test_ratio_values_outside_the_range_are_refused(value):
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < 1
    if ok:
        assert ratios.check_sparsity(value, "x") == float(value)
    else:
        with pytest.raises(LlmpruneError, match=r"must be a number in \[0, 1\)"):
            ratios.check_sparsity(value, "x")


# -- property tests on masks -------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(shape=st.tuples(st.integers(1, 12), st.integers(1, 12)), sparsity=st.floats(0, 0.99),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 999),
       per_row=st.booleans())
def test_masks_keep_survivors_bit_identical_and_prune_the_smallest(shape, sparsity, dtype, seed, per_row):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randint(-3, 4, shape, generator=g).float() / 2).to(dtype)  # ties and negative zeros
    keep = masks.unstructured(w.abs(), sparsity, per_row=per_row)
    out = masks.apply(w, keep)
    bits = masks._SAME_WIDTH_INT[w.element_size()]
    assert torch.equal(out[keep].view(bits), w[keep].view(bits))  # survivors to the bit
    assert torch.equal(out[~keep].view(bits), torch.zeros_like(out[~keep]).view(bits))  # +0.0, never -0.0
    rows = [slice(None)] if not per_row else [slice(r, r + 1) for r in range(shape[0])]
    for r in rows:
        k, a = keep[r], w.abs()[r].float()
        want = masks.prune_count(k.numel(), sparsity)
        assert int((~k).sum()) == want
        if 0 < want < k.numel():
            assert a[~k].max() <= a[k].min()
