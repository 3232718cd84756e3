"""What makes an output travel: its model card, loading and decompressing the sparse format, and
pushing it to the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from . import sparse
from .errors import LlmpruneError

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def input_card_metadata(folder: Path) -> dict:
    """YAML front matter of the input's own README.md, if it has one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _layer_table(recipe: dict) -> str:
    rows = ["| layer | sparsity |", "|---:|---:|"]
    for i, s in enumerate(recipe["sparsity"]["layers"]):
        rows.append(f"| {i} | {s:.2%} |")
    return "\n".join(rows)


def _chart_link(recipe: dict) -> list[str]:
    """The per-layer sparsity chart saved beside the model, when the run drew one."""
    chart = recipe.get("plots", {}).get("sparsity")
    return [f"![Sparsity per decoder layer]({chart})", ""] if chart else []


def _eval_section(recipe: dict) -> list[str]:
    """Dense vs pruned perplexity, when the run measured it."""
    ev = recipe.get("eval")
    if not ev or "pruned" not in ev:
        return []
    tuned = recipe.get("finetune", {}).get("eval", {}).get("after")
    return [
        "## Perplexity",
        "",
        f"On `{ev['data']}`, {ev['windows']} windows of {ev['seqlen']} tokens (lower is better):",
        "",
        "| model | perplexity |",
        "|---|---:|",
        f"| dense (input) | {ev['dense']['perplexity']:.3f} |",
        f"| pruned{'' if tuned else ' (this model)'} | {ev['pruned']['perplexity']:.3f} |",
        *([f"| pruned and fine-tuned (this model) | {tuned['perplexity']:.3f} |"] if tuned else []),
        f"| ratio pruned / dense | {ev['ratio']:.3f} |",
        "",
    ]


def finetune_section(recipe: dict) -> list[str]:
    """What the mask-preserving fine-tune did, when there was one."""
    ft = recipe.get("finetune")
    if not ft:
        return []
    loss = ft.get("loss", {})
    lines = [
        "## Fine-tune",
        "",
        f"{ft['mode']} mode, {ft['config']['steps']} steps{' per layer' if ft['mode'] == 'blockwise' else ''} on "
        f"{ft['data']} ({ft['windows']} windows of {ft['seqlen']} tokens), {ft['config']['optim']}, "
        f"lr {ft['config']['lr']}; every pruned weight stayed exactly zero "
        f"({recipe['sparsity']['overall']:.4%} of the pruned matrices).",
    ]
    if "first" in loss:
        lines.append(f"Training loss {loss['start_mean']:.4f} -> {loss['end_mean']:.4f}.")
    if "eval" in ft:
        ev = ft["eval"]
        lines.append(f"Perplexity on {ev['data']} ({ev['windows']} x {ev['seqlen']} tokens): "
                     f"{ev['before']['perplexity']:.3f} -> {ev['after']['perplexity']:.3f}.")
    return [*lines, ""]


def _save_format(recipe: dict) -> str:
    return (recipe.get("save") or {}).get("format", "dense")


def _storage_sentence(recipe: dict) -> str:
    save = recipe.get("save") or {}
    if _save_format(recipe) != sparse.FORMAT:
        return "It loads with plain `AutoModelForCausalLM.from_pretrained`; the zeros are stored densely."
    return (f"The weights are stored in llmprune's compressed `{sparse.FORMAT}` format: "
            f"{save['bytes'] / 1e6:.1f} MB instead of {save['dense_bytes'] / 1e6:.1f} MB dense.")


def _loading_section(recipe: dict) -> list[str]:
    """How to load a sparse-bitmask output (nothing to say for a dense one)."""
    if _save_format(recipe) != sparse.FORMAT:
        return []
    return [
        "## Loading",
        "",
        "Every path below gives weights bit-identical to the dense save (`pip install llmprune`):",
        "",
        "```python",
        "import llmprune  # registers the format with transformers",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(REPO_OR_FOLDER)  # an ordinary dense model",
        "model = llmprune.load(FOLDER)  # the same, without transformers' quantizer hooks",
        "```",
        "",
        "For runtimes that do not import llmprune (vLLM, llama.cpp converters, TGI), write a dense "
        "Hugging Face checkpoint first: `llmprune decompress FOLDER DENSE_FOLDER`.",
        "",
    ]


def _intro(recipe: dict, source: str, link: str, overall: float) -> list[str]:
    cfg = recipe["config"]
    by = f"[llmprune](https://pypi.org/project/llmprune/) ({cfg['method']}, {cfg['pattern']})"
    st = recipe.get("structured")
    if st:
        p = st["parameters"]
        return [f"# {source} with {cfg['pattern']} pruned ({1 - p['after'] / p['before']:.1%} fewer parameters)", "",
                f"This model is {link} with {st['ratio']:.0%} of its {cfg['pattern']} removed by {by}, ranked by "
                f"{st['importance']}: a smaller dense model, {p['before']:,} -> {p['after']:,} parameters. "
                "It loads with plain `AutoModelForCausalLM.from_pretrained`."]
    return [f"# {source} pruned to {overall:.1%} sparsity", "",
            f"This model is {link} with {overall:.1%} of the weights of its decoder layers' linear layers set to "
            f"zero by {by}. " + _storage_sentence(recipe)]


def model_card(recipe: dict, base_model: str | None, input_meta: dict) -> str:
    """README.md for an output folder: Hub metadata, the recipe, per-layer sparsity, the command."""
    cfg = recipe["config"]
    meta: dict = {}
    if base_model:
        meta["base_model"] = base_model
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    if input_meta.get("license"):
        meta["license"] = input_meta["license"]
    if input_meta.get("language"):
        meta["language"] = input_meta["language"]
    meta["tags"] = ["pruned", "sparse", "llmprune", cfg["method"]]
    if _save_format(recipe) == sparse.FORMAT:
        meta["tags"].append(sparse.FORMAT)
    front = yaml.safe_dump(meta, sort_keys=False).strip()
    overall = recipe["sparsity"]["overall"]
    source = base_model or recipe["input"]["model"]
    link = f"[{source}]({'https://huggingface.co/' + source if base_model else source})"
    lines = [
        f"---\n{front}\n---",
        *_intro(recipe, source, link, overall),
        "",
        *_loading_section(recipe),
        "## Recipe",
        "",
        "| option | value |",
        "|---|---|",
    ]
    for key in ("method", "pattern", "norm", "sparsity", "ratios", "schedule", "dtype", "true_sequential"):
        if cfg.get(key) is not None:
            lines.append(f"| {key} | {cfg[key]} |")
    if "calibration" in recipe:
        c = recipe["calibration"]
        lines.append(f"| calibration | {c['nsamples']} x {c['seqlen']} tokens of {c['data']}, seed {c['seed']} |")
    lines += [
        f"| matrices pruned | {recipe['sparsity']['matrices_pruned']} |",
        f"| overall sparsity (pruned matrices) | {overall:.4%} |",
        "",
        *_eval_section(recipe),
        *finetune_section(recipe),
        "## Sparsity per decoder layer",
        "",
        *_chart_link(recipe),
        _layer_table(recipe),
        "",
        "## Reproduce",
        "",
        "```",
        recipe.get("command") or "",
        "```",
        "",
        f"llmprune {recipe['versions']['llmprune']}, torch {recipe['versions']['torch']}, "
        f"transformers {recipe['versions']['transformers']}. The full recipe is in `llmprune.json`.",
        "",
    ]
    return "\n".join(lines)


def read_recipe(folder: Path) -> dict:
    try:
        recipe = json.loads((folder / "llmprune.json").read_text())
    except (OSError, ValueError):
        raise LlmpruneError(f"{folder} is not a complete llmprune output: llmprune.json is missing or unreadable") from None
    if not isinstance(recipe, dict):
        raise LlmpruneError(f"{folder} is not a complete llmprune output: llmprune.json is not an object")
    return recipe


def check_complete(folder: Path) -> dict:
    """Refuse a folder that is not a finished llmprune output; returns its recipe.

    Complete means: config.json, README.md and llmprune.json, and weights that open (every shard
    the index names is present and whole, every compressed matrix has its three parts).
    """
    from .checkpoint import Checkpoint

    if not folder.is_dir():
        raise LlmpruneError(f"{folder} is not a folder")
    missing = [n for n in ("config.json", "README.md", "llmprune.json") if not (folder / n).is_file()]
    if missing:
        raise LlmpruneError(f"{folder} is not a complete llmprune output: {missing[0]} is missing")
    recipe = read_recipe(folder)
    Checkpoint(folder).close()
    return recipe


def load(folder: str | os.PathLike, **kwargs) -> torch.nn.Module:
    """An ordinary transformers model from an llmprune output in either save format.

    A sparse-bitmask folder is decompressed through llmprune's own reader, not transformers'
    quantizer hooks; ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .checkpoint import Checkpoint

    path = Path(folder)
    if not sparse.folder_compressed_names(path):
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    config = AutoConfig.from_pretrained(str(path))
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
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=state, **kwargs)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def decompress(folder: Path, output: Path, overwrite: bool = False, max_shard_size: str = "5GB",
               progress: bool = True) -> dict:
    """Write the sparse-bitmask output ``folder`` as a dense Hugging Face checkpoint in ``output``.

    Tensors are decompressed one at a time (memory O(largest matrix)); the folder is written in a
    temporary sibling and renamed into place when complete. Returns the new recipe.
    """
    from .checkpoint import Checkpoint, ShardWriter, parse_size
    from .pipeline import check_output, closing_on_error, copy_aux_files, save_summary, temp_output

    recipe = check_complete(folder)
    if not sparse.folder_compressed_names(folder):
        raise LlmpruneError(f"{folder} is already dense (not {sparse.FORMAT}): nothing to decompress")
    check_output(output, folder, overwrite)
    checkpoint = Checkpoint(folder)
    specs = [checkpoint.spec(name) for name in checkpoint.names]
    try:
        with temp_output(output) as tmp:
            writer = ShardWriter(tmp, specs, parse_size(max_shard_size))
            with closing_on_error(writer):
                for name in tqdm(checkpoint.names, desc="decompress", unit="tensor", disable=not progress):
                    writer.write(name, checkpoint.read(name))
                writer.close()
            copy_aux_files(folder, tmp, None)
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
