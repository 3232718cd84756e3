"""Hub-ready outputs: the sparse-bitmask format and its load paths, the model card, push."""

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmprune
from conftest import build_tiny, run_cli
from llmprune import sparse
from llmprune.checkpoint import Checkpoint


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view: equal bits, including -0.0 vs +0.0."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])) for k in a)


def load_all(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- the format, by hand -------------------------------------------------------------------------

def test_bitmask_layout_by_hand():
    row = torch.tensor([[1.0, 0, 0, 4, 0, 6, 0, 0, 9], [0, 0, 0, 0, 0, 0, 0, 0, -0.0]])
    parts = sparse.compress(row)
    # row 0 keeps columns 0, 3, 5 (1 + 8 + 32) and 8 (next byte, bit 0); row 1 keeps only the -0.0
    assert parts["bitmask"].tolist() == [[41, 1], [0, 1]]
    assert parts["values"].tolist() == [1.0, 4.0, 6.0, 9.0, 0.0]
    assert str(parts["values"][-1].item()) == "-0.0"
    assert parts["shape"].tolist() == [2, 9]
    assert torch.equal(bits(sparse.decompress(parts)), bits(row))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compress_roundtrip_is_bit_identical(dtype):
    torch.manual_seed(0)
    w = torch.randn(37, 70).to(dtype)
    w[w.abs() < 0.6] = 0
    w[3, :5] = -0.0
    assert torch.equal(bits(sparse.decompress(sparse.compress(w))), bits(w))


def test_corrupt_parts_are_refused():
    parts = sparse.compress(torch.tensor([[1.0, 0, 2, 0]]))
    parts["values"] = parts["values"][:1]
    with pytest.raises(llmprune.errors.LlmpruneError, match="2 stored positions but 1 values"):
        sparse.decompress(parts, "x")


# --- save formats and load paths through the CLI -------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family pruned to 50% twice from the same bf16 input: dense and sparse-bitmask."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for family, extra in (("llama", {"tie_word_embeddings": True}), ("gpt2", {})):
        src = build_tiny(family, root / family, dtype=torch.bfloat16, **extra)
        for fmt in sparse.SAVE_FORMATS:
            folder = root / f"{family}-{fmt}"
            assert run_cli(src, "--sparsity", "0.5", "-o", folder, "-q", "--max-shard-size", "50KB",
                           "--save-format", fmt) == 0
            out[family, fmt] = folder
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_load_path_is_bit_identical_to_the_dense_save(saved, tmp_path, family):
    dense_dir, sparse_dir = saved[family, "dense"], saved[family, "sparse-bitmask"]
    reference = state(AutoModelForCausalLM.from_pretrained(dense_dir))

    stored = load_all(sparse_dir)
    assert any(k.endswith(".weight_bitmask") for k in stored) and not any(k.endswith("proj.weight") for k in stored)
    config = json.loads((sparse_dir / "config.json").read_text())
    assert config["sparsity_config"]["format"] == "sparse-bitmask" and config["sparsity_config"]["version"] == 1
    assert len(config["sparsity_config"]["compressed"]) == (21 if family == "llama" else 12)

    # plain from_pretrained after `import llmprune`: an ordinary model, nothing left of the format
    model = AutoModelForCausalLM.from_pretrained(sparse_dir)
    assert getattr(model.config, "quantization_config", None) is None
    assert same_bits(state(model), reference)
    # llmprune.load, through llmprune's own reader
    assert same_bits(state(llmprune.load(sparse_dir)), reference)
    # the streaming reader the pipeline uses
    checkpoint = Checkpoint(sparse_dir)
    assert same_bits({n: checkpoint.read(n) for n in checkpoint.names}, load_all(dense_dir))
    # llmprune decompress: the same tensors as the dense save, loadable without llmprune
    back = tmp_path / "back"
    assert run_cli("decompress", sparse_dir, back, "-q") == 0
    assert same_bits(load_all(back), load_all(dense_dir))
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    assert json.loads((back / "llmprune.json").read_text())["save"]["format"] == "dense"
    # a model loaded from the sparse folder saves as a plain dense checkpoint
    model.save_pretrained(tmp_path / "resaved")
    assert "quantization_config" not in json.loads((tmp_path / "resaved" / "config.json").read_text())


def test_sparse_output_is_an_input_like_any_other(saved, tmp_path):
    out = tmp_path / "again"
    assert run_cli(saved["llama", "sparse-bitmask"], "--sparsity", "0.5", "-o", out, "-q") == 0
    assert same_bits(load_all(out), load_all(saved["llama", "dense"]))  # pruning 50% again changes nothing


@pytest.mark.parametrize("stream", [False, True])
def test_evaluation_of_a_sparse_save_equals_the_dense_save(saved, stream):
    from llmprune.perplexity import evaluate

    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ppl = {fmt: evaluate(str(saved["llama", fmt]), windows=windows, stream=stream, device="cpu", dtype="float32",
                         progress=False).perplexity for fmt in sparse.SAVE_FORMATS}
    assert ppl["sparse-bitmask"] == ppl["dense"]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_half_sparse_bf16_is_at_most_0_6_of_the_dense_save(tmp_path, pattern):
    # LLaMA-shaped: the decoder linears hold nearly all the weights, as in a 7B model (96%)
    src = build_tiny("llama", tmp_path / "src", dtype=torch.bfloat16, vocab_size=64, tie_word_embeddings=True,
                     hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=4)
    sizes = {}
    for fmt in sparse.SAVE_FORMATS:
        out = tmp_path / fmt
        assert run_cli(src, "--sparsity", "0.5", "--pattern", pattern, "-o", out, "-q", "--save-format", fmt) == 0
        sizes[fmt] = weights_bytes(out)
        recipe = json.loads((out / "llmprune.json").read_text())
        assert recipe["save"] == {"format": fmt, "bytes": sizes[fmt], "dense_bytes": recipe["save"]["dense_bytes"]}
    # values: half of 16 bits; bitmask: 1 bit -> 9/16 of the linears, plus headers and the small rest
    assert sizes["sparse-bitmask"] <= 0.6 * sizes["dense"], sizes
    assert sizes["sparse-bitmask"] >= 0.5625 * sizes["dense"] * 0.9, sizes


def test_save_format_refusals(tiny_models, tmp_path, capsys):
    assert run_cli(tiny_models["llama"], "--sparsity", "0.5", "--save-format", "zip", "-o", tmp_path / "o", "-q") == 2
    assert "invalid choice: 'zip'" in capsys.readouterr().err
    dense = tmp_path / "dense"
    assert run_cli(tiny_models["llama"], "--sparsity", "0.5", "-o", dense, "-q") == 0
    capsys.readouterr()
    assert run_cli("decompress", dense, tmp_path / "x", "-q") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already dense" in err and not (tmp_path / "x").exists()


def test_missing_part_is_refused(saved, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved["llama", "sparse-bitmask"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["sparsity_config"]["compressed"].append("model.layers.0.ghost.weight")
    (broken / "config.json").write_text(json.dumps(config))
    assert run_cli("decompress", broken, tmp_path / "x", "-q") == 2
    assert "'model.layers.0.ghost.weight_bitmask' is missing" in capsys.readouterr().err


def test_unknown_format_version_is_refused(saved, tmp_path, capsys):
    import shutil

    newer = tmp_path / "newer"
    shutil.copytree(saved["llama", "sparse-bitmask"], newer)
    config = json.loads((newer / "config.json").read_text())
    config["sparsity_config"]["version"] = 2
    (newer / "config.json").write_text(json.dumps(config))
    assert run_cli("eval", newer, "-q") == 2
    assert "sparse-bitmask version 2 is not supported" in capsys.readouterr().err


def test_after_import_hook_runs_once_the_module_has_loaded(tmp_path, monkeypatch):
    from llmprune.hf import AfterImport

    (tmp_path / "llmprune_probe_mod.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = AfterImport("llmprune_probe_mod", lambda: seen.append(sys.modules["llmprune_probe_mod"].VALUE))
    sys.meta_path.insert(0, hook)
    try:
        import llmprune_probe_mod  # noqa: F401
    finally:
        sys.modules.pop("llmprune_probe_mod", None)
    assert seen == [42] and hook not in sys.meta_path


def test_from_pretrained_is_registered():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert sparse.QUANT_METHOD in AUTO_QUANTIZER_MAPPING and sparse.QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING


@pytest.mark.slow  # a fresh interpreter: a few seconds on an idle machine, minutes on a loaded one
def test_import_llmprune_leaves_transformers_alone_until_it_loads(saved):
    """`import llmprune` does not import transformers; from_pretrained afterwards still decompresses."""
    code = (
        "import sys, llmprune\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(saved['llama', 'sparse-bitmask'])!r})\n"
        "print(int((m.model.layers[0].mlp.up_proj.weight == 0).sum()), m.model.layers[0].mlp.up_proj.weight.numel())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(llmprune.__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    zeros, numel = (int(x) for x in res.stdout.split()[-2:])
    assert zeros == numel // 2


# --- model card ----------------------------------------------------------------------------------

def test_card_metadata_from_the_input_card(tmp_path):
    from huggingface_hub import ModelCard

    src = build_tiny("llama", tmp_path / "src")
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someorg/base-7b\nlanguage: en\n---\n# base\n")
    out = tmp_path / "out"
    assert run_cli(src, "--pattern", "2:4", "-o", out, "-q", "--save-format", "sparse-bitmask") == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "someorg/base-7b"
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"pruned", "sparse", "llmprune", "magnitude", "sparse-bitmask"} <= set(card.data.tags)
    text = card.text
    assert "| 0 | 50.00% |" in text and "| 2 | 50.00% |" in text  # per-layer sparsity
    # the command that reproduces it, local paths by their names only
    assert "llmprune src -o out --pattern 2:4 --save-format sparse-bitmask\n" in text and str(tmp_path) not in text
    assert "llmprune decompress" in text and "llmprune.load" in text


# --- push to a local Hub endpoint ----------------------------------------------------------------

class FakeHub:
    """The Hub API calls huggingface_hub makes to create a repo, a branch and one commit."""

    users = {"good-token": {"name": "alice", "type": "user", "orgs": [{"name": "readers"}]}}

    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: [commits]}}
        self.calls: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, handler, status: int, body: dict):
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def handle(self, handler, method: str):
        path = handler.path.split("?")[0]
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        self.calls.append((method, path))
        user = self.users.get(handler.headers.get("Authorization", "").removeprefix("Bearer "))
        if user is None:
            return self.reply(handler, 401, {"error": "Invalid credentials in Authorization header"})
        parts = path.strip("/").split("/")
        if path == "/api/validate-yaml":  # the model card's metadata, checked before a commit
            return self.reply(handler, 200, {"errors": [], "warnings": []})
        if path == "/api/whoami-v2":
            return self.reply(handler, 200, {**user, "auth": {"type": "access_token"}})
        if path == "/api/repos/create" and method == "POST":
            return self.create_repo(handler, user, json.loads(body))
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, action, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            if repo not in self.repos:
                return self.reply(handler, 404, {"error": "Repository not found"})
            if action == "branch" and method == "POST":
                self.repos[repo]["branches"].setdefault(rev, [])
                return self.reply(handler, 200, {})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self.reply(handler, 200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
            if action == "commit":
                return self.commit(handler, repo, rev, body)
        self.unknown.append((method, path))
        return self.reply(handler, 404, {"error": f"not implemented: {method} {path}"})

    def create_repo(self, handler, user, req):
        namespace = req.get("organization") or user["name"]
        repo = f"{namespace}/{req['name']}"
        if namespace != user["name"]:  # alice only reads in "readers"
            return self.reply(handler, 403, {"error": f"You don't have the rights to create a model under {namespace}"})
        if repo in self.repos:
            return self.reply(handler, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"})
        self.repos[repo] = {"private": req.get("visibility", "public") == "private", "branches": {"main": []}}
        return self.reply(handler, 200, {"url": f"{self.url}/{repo}"})

    def commit(self, handler, repo, rev, body):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
        oid = f"{len(self.calls):040x}"
        self.repos[repo]["branches"][rev].append({"oid": oid, "summary": header["summary"], "files": files})
        return self.reply(handler, 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid,
                                         "pullRequestUrl": None})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = FakeHub()
    # huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, when it is imported (before this test)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setenv("HF_TOKEN", "good-token")
    yield server
    server.server.shutdown()


def test_push_uploads_the_folder_as_one_commit(saved, hub, capsys):
    folder = saved["llama", "sparse-bitmask"]
    assert run_cli("push", folder, "alice/tiny-sparse", "--private", "--revision", "v1",
                   "--commit-message", "first upload") == 0
    repo = hub.repos["alice/tiny-sparse"]
    assert repo["private"] is True
    assert repo["branches"]["main"] == [] and len(repo["branches"]["v1"]) == 1
    commit = repo["branches"]["v1"][0]
    assert commit["summary"] == "first upload"
    local = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert commit["files"] == local  # every file, byte for byte, in one commit
    assert f"{hub.url}/alice/tiny-sparse/commit/{commit['oid']}" in capsys.readouterr().out
    assert not hub.unknown

    # again, to an existing repo and the default branch, with the default message
    assert run_cli("push", folder, "alice/tiny-sparse", "-q") == 0
    assert len(repo["branches"]["main"]) == 1 and repo["branches"]["main"][0]["summary"].startswith("llmprune: ")


def test_prune_with_push_to_hub(tiny_models, hub, tmp_path):
    out = tmp_path / "out"
    assert run_cli(tiny_models["llama"], "--sparsity", "0.5", "-o", out, "-q", "--push-to-hub", "alice/pruned",
                   "--push-revision", "exp") == 0
    files = hub.repos["alice/pruned"]["branches"]["exp"][0]["files"]
    assert files["llmprune.json"] == (out / "llmprune.json").read_bytes()
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)


def expect_push_error(capsys, args, message):
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("llmprune: error: ") and message in err, err


def test_push_refusals(saved, hub, monkeypatch, tmp_path, capsys):
    folder = saved["llama", "dense"]
    expect_push_error(capsys, ["push", folder, "bob/model"], "belongs to 'bob'")
    expect_push_error(capsys, ["push", folder, "readers/model"], "belongs to someone else or the token cannot write")
    expect_push_error(capsys, ["push", folder, "not a repo"], "is not a Hub repo id")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in ("config.json", "README.md"):
        (incomplete / name).write_bytes((folder / name).read_bytes())
    expect_push_error(capsys, ["push", incomplete, "alice/x"], "not a complete llmprune output: llmprune.json is missing")
    monkeypatch.setenv("HF_TOKEN", "stolen-token")
    expect_push_error(capsys, ["push", folder, "alice/x"], "the Hub rejected the credentials")
    monkeypatch.delenv("HF_TOKEN")
    expect_push_error(capsys, ["push", folder, "alice/x"], "no Hugging Face credentials")
    # a prune that would push checks for credentials before it runs
    expect_push_error(capsys, [folder, "--sparsity", "0.5", "-o", tmp_path / "never", "--push-to-hub", "alice/x"],
                      "no Hugging Face credentials")
    assert not (tmp_path / "never").exists()
    assert hub.repos == {}
