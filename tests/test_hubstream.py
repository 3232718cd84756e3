"""--stream-from-hub against a local Hub (HF_ENDPOINT): shards fetched one at a time, deleted once read."""

import json

import pytest

from conftest import build_tiny, run_cli, tree_hash
from hubmock import HubMock

MODEL_FILES = ("llmprune.json", "README.md")  # the card and recipe name the source, which differs


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import tempfile

    from huggingface_hub import constants

    src = build_tiny("llama", tmp_path / "src", shard="100KB")
    server = HubMock({"acme/tiny": src})
    # huggingface_hub reads these once, when it is imported
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / "scratch").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    yield server, src
    server.close()


def test_stream_from_hub_holds_few_shards_and_matches_a_local_run(hub, tmp_path):
    server, src = hub
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) >= 5
    held = []
    server.on_get = lambda name: held.append(len(list((tmp_path / "scratch").rglob("model-*.safetensors"))))

    out = tmp_path / "out"
    assert run_cli("acme/tiny", "--sparsity", "0.5", "--stream-from-hub", "-o", out, "-q") == 0
    local = tmp_path / "local"
    assert run_cli(src, "--sparsity", "0.5", "-o", local, "-q") == 0
    differ = [p.name for p in local.iterdir() if p.name not in MODEL_FILES and
              (not (out / p.name).exists() or (out / p.name).read_bytes() != p.read_bytes())]
    assert differ == [] and tree_hash(out, MODEL_FILES) == tree_hash(local, MODEL_FILES), differ

    downloads = [p.rsplit("/", 1)[-1] for m, p, r in server.requests if m == "GET" and r is None and
                 p.endswith(".safetensors")]
    assert len(downloads) == len(set(downloads)) and set(downloads) <= set(shards)  # none twice
    # the bound: the shards of two consecutive layers (one is read ahead); the tensors outside the
    # layers, read first, come by ranged requests and pin nothing
    where = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    layer = lambda n: int(n.split(".")[2]) if n.startswith("model.layers.") else None  # noqa: E731
    bound = max(len({f for n, f in where.items() if layer(n) in (i, i + 1)}) for i in range(3))
    assert bound < len(shards) and max(held) + 1 <= bound, (held, bound)
    ranged = [p.rsplit("/", 1)[-1] for m, p, r in server.requests if m == "GET" and r is not None]
    assert len(ranged) > 2 * len(shards)  # two per header, then small tensors read alone
    assert list((tmp_path / "scratch").iterdir()) == []  # nothing left behind
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # weights never went to the cache
    recipe = json.loads((out / "llmprune.json").read_text())
    assert recipe["input"]["commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert recipe["input"]["shards"] == json.loads((local / "llmprune.json").read_text())["input"]["shards"]
