import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmprune.checkpoint import Checkpoint, TensorSpec, resolve
from llmprune.devices import parse_size
from llmprune.shards import ShardWriter
from llmprune.errors import LlmpruneError


def test_writer_plans_shards_and_safetensors_reads_them(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 7 + i).to(torch.bfloat16) for i in range(5)}
    tensors["ids"] = torch.arange(6)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path, specs, max_shard_bytes=400)
    for name in reversed(list(tensors)):  # any order: offsets are planned
        writer.write(name, tensors[name])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    got = {}
    for f in files:
        got.update(load_file(tmp_path / f))
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[n], tensors[n]) for n in tensors)


def test_writer_refuses_unplanned_shapes_and_missing_tensors(tmp_path):
    writer = ShardWriter(tmp_path, [TensorSpec("a", torch.float32, (2, 2)), TensorSpec("b", torch.float32, (1,))], 10**6)
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(3, 2))
    writer.write("a", torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
    writer.abort()


def test_reader_matches_safetensors(tmp_path):
    tensors = {"x": torch.randn(3, 4), "y": torch.randn(5).half(), "z": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint(tmp_path)
    assert sorted(ckpt.names) == ["x", "y", "z"]
    for n, t in tensors.items():
        assert torch.equal(ckpt.read(n), t)
    assert ckpt.spec("x") == TensorSpec("x", torch.float32, (3, 4))
    fp = ckpt.fingerprint()["model.safetensors"]
    assert fp["bytes"] == (tmp_path / "model.safetensors").stat().st_size and len(fp["header_sha256"]) == 64
    ckpt.close()


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:4], "shorter than a header"),
    (lambda b: b[:8] + b"{not json" + b[17:], "corrupt safetensors"),
    (lambda b: b[:-3], "truncated"),
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "header length out of range"),
])
def test_damaged_files_are_refused(tmp_path, damage, message):
    save_file({"x": torch.randn(8, 8)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(LlmpruneError, match=message):
        Checkpoint(tmp_path)


def test_index_naming_a_missing_file(tmp_path):
    save_file({"x": torch.randn(2)}, tmp_path / "a.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(LlmpruneError, match="names b.safetensors, which is missing"):
        Checkpoint(tmp_path)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1GiB") == 2**30
    assert parse_size("300") == 300
    with pytest.raises(LlmpruneError):
        parse_size("lots")


def _fake_hub_cache(cache, repo, files_from, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub's cache uses: refs/main -> snapshots/<commit>/files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    shutil.copytree(files_from, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return commit


def test_hub_id_resolves_from_the_local_cache_offline(tiny_models, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    commit = _fake_hub_cache(cache, "acme/tiny-llama", tiny_models["llama"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    folder, info = resolve("acme/tiny-llama")
    assert folder.name == commit and (folder / "config.json").exists()
    assert info == {"model": "acme/tiny-llama", "revision": "main", "commit": commit, "path": str(folder)}
    folder, info = resolve("acme/tiny-llama", revision=commit)
    assert info["commit"] == commit
    with pytest.raises(LlmpruneError, match="acme/other"):
        resolve("acme/other")


def test_prune_a_hub_id_through_the_cli(tiny_models, tmp_path, monkeypatch):
    from conftest import run_cli
    from huggingface_hub import ModelCard

    cache = tmp_path / "hub"
    commit = _fake_hub_cache(cache, "acme/tiny-llama", tiny_models["llama"])
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    assert run_cli("acme/tiny-llama", "--sparsity", "0.5", "-o", out, "-q") == 0
    recipe = json.loads((out / "llmprune.json").read_text())
    assert recipe["input"]["commit"] == commit and recipe["input"]["revision"] == "main"
    assert ModelCard.load(out / "README.md").data.base_model == "acme/tiny-llama"
