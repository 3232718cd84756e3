"""What makes an output travel: its model card, loading and decompressing the sparse format, and
pushing it to the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import sparse
from .arch import load_config, model_class
from .card import HUB_ID, input_card_metadata, model_card
from .checkpoint import Checkpoint
from .devices import parse_size
from .errors import LlmpruneError
from .output import check_output, closing_on_error, copy_aux_files, temp_output
from .recipe import save_summary
from .shards import ShardWriter
from .source import read_recipe

log = logging.getLogger(__name__)


def check_complete(folder: Path) -> dict:
    """Refuse a folder that is not a finished llmprune output; returns its recipe.

    Complete means: config.json, README.md and llmprune.json, and weights that open (every shard
    the index names is present and whole, every compressed matrix has its three parts).
    """

    if not folder.is_dir():
        raise LlmpruneError(f"{folder} is not a folder")
    missing = [n for n in ("config.json", "README.md", "llmprune.json") if not (folder / n).is_file()]
    if missing:
        raise LlmpruneError(f"{folder} is not a complete llmprune output: {missing[0]} is missing")
    recipe = read_recipe(folder, required=True)
    Checkpoint(folder).close()
    return recipe


def load(folder: str | os.PathLike, **kwargs) -> torch.nn.Module:
    """An ordinary transformers model from an llmprune output in either save format.

    A sparse-bitmask folder is decompressed through llmprune's own reader, not transformers'
    quantizer hooks; ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        GenerationConfig,
    )

    path = Path(folder)
    config = AutoConfig.from_pretrained(str(path))
    cls = model_class(config)  # a causal LM, or a multimodal checkpoint's own class
    if not sparse.folder_compressed_names(path):
        return cls.from_pretrained(str(path), **kwargs)
    for key in ("quantization_config", sparse.CONFIG_KEY):
        if hasattr(config, key):
            delattr(config, key)
    checkpoint = Checkpoint(path)
    try:
        state = {name: checkpoint.read(name) for name in checkpoint.names}
    finally:
        checkpoint.close()
    # transformers takes a state dict only without a path (so from the model class, not the Auto
    # class); the generation config then comes separately
    mapping = {AutoModelForCausalLM: MODEL_FOR_CAUSAL_LM_MAPPING,
               AutoModelForImageTextToText: MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING}
    concrete = mapping[cls][type(config)] if cls in mapping else cls
    model = concrete.from_pretrained(None, config=config, state_dict=state, **kwargs)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def decompress(folder: Path, output: Path, overwrite: bool = False, max_shard_size: str = "5GB",
               progress: bool = True) -> dict:
    """Write the sparse-bitmask output ``folder`` as a dense Hugging Face checkpoint in ``output``.

    Tensors are decompressed one at a time (memory O(largest matrix)); the folder is written in a
    temporary sibling and renamed into place when complete. Returns the new recipe.
    """

    recipe = check_complete(folder)
    if not sparse.folder_compressed_names(folder):
        raise LlmpruneError(f"{folder} is already dense (not {sparse.FORMAT}): nothing to decompress")
    check_output(output, folder, overwrite)
    checkpoint = Checkpoint(folder)
    specs = [checkpoint.spec(name) for name in checkpoint.names]
    try:
        with temp_output(output, overwrite) as tmp:
            writer = ShardWriter(tmp, specs, parse_size(max_shard_size))
            with closing_on_error(writer):
                for name in tqdm(checkpoint.names, desc="decompress", unit="tensor", disable=not progress):
                    writer.write(name, checkpoint.read(name))
                writer.close()
            copy_aux_files(folder, tmp, load_config(str(folder)), None)
            recipe["save"] = {**save_summary(tmp, "dense", specs), "decompressed_from": str(folder)}
            (tmp / "llmprune.json").write_text(json.dumps(recipe, indent=2) + "\n")
            meta = input_card_metadata(folder)
            (tmp / "README.md").write_text(model_card(recipe, meta.get("base_model"), meta))
    finally:
        checkpoint.close()
    log.info("wrote %s", output)
    return recipe


def _hub_reason(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def require_token(token: str | None = None) -> str:
    """``token``, else the saved login or ``HF_TOKEN``; a one-line error when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise LlmpruneError("no Hugging Face credentials: log in with `hf auth login` or set HF_TOKEN")
    return token


def push(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> dict:
    """Upload a complete llmprune output to the Hub as one commit, creating the repo when missing.

    Credentials are the user's saved login or ``HF_TOKEN`` (``token`` overrides both); the endpoint
    is ``HF_ENDPOINT``. Returns the repo, branch, commit id and URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    recipe = check_complete(folder)
    if not HUB_ID.match(repo_id) or "/" not in repo_id:
        raise LlmpruneError(f"{repo_id!r} is not a Hub repo id: expected NAMESPACE/NAME")
    api = HfApi(token=require_token(token))
    namespace = repo_id.split("/")[0]
    try:
        user = api.whoami()
    except HfHubHTTPError as err:
        raise LlmpruneError(f"the Hub rejected the credentials (log in again or set a valid HF_TOKEN): "
                            f"{_hub_reason(err)}") from None
    except OSError as err:
        raise LlmpruneError(f"cannot reach the Hub: {_hub_reason(err)}") from None
    mine = {user.get("name")} | {org.get("name") for org in user.get("orgs") or []}
    if namespace not in mine:
        raise LlmpruneError(f"{repo_id} belongs to {namespace!r}, and the logged-in user {user.get('name')!r} "
                            f"can write only to {', '.join(sorted(n for n in mine if n))}")
    message = commit_message or f"llmprune: {_commit_summary(recipe)}"
    try:
        # without --private the Hub's default applies (an organisation may default to private)
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=message, ignore_patterns=[".*"])
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise LlmpruneError(f"the Hub refused to write to {repo_id} (HTTP {status}): the repo belongs to "
                                f"someone else or the token cannot write") from None
        raise LlmpruneError(f"pushing to {repo_id} failed: {_hub_reason(err)}") from None
    except OSError as err:
        raise LlmpruneError(f"pushing to {repo_id} failed: {_hub_reason(err)}") from None
    log.info("pushed %s to %s (commit %s)", folder, info.commit_url, info.oid)
    return {"repo_id": repo_id, "revision": revision or "main", "commit": info.oid, "url": str(url),
            "commit_url": info.commit_url, "private": private}


def _commit_summary(recipe: dict) -> str:
    cfg = recipe.get("config") or {}
    overall = (recipe.get("sparsity") or {}).get("overall")
    share = f" to {overall:.1%}" if isinstance(overall, (int, float)) else ""
    return f"{(recipe.get('input') or {}).get('model', 'model')} pruned{share} ({cfg.get('method')}, {cfg.get('pattern')})"
